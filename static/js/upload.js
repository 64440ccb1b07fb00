// Drag and drop onto the upload form, with previews before sending. The form works without it.

// More files than the double has room for are refused in the browser, with the server's words:
// past Django's own limit the server could only answer a bare 400. False when there are too many.
function checkRoom(input) {
  const tooMany = input.files.length > Number(input.dataset.room);
  input.setCustomValidity(tooMany ? input.dataset.tooMany : "");
  return !tooMany;
}

// File names are display text only. Django's multipart parser refuses a whole request for one
// long file name (500 Chinese characters) and drops a file whose name is unprintable, so each
// file travels under a short safe name ("photo-3.jpg") and its own name goes in "names", in
// the same order, for the page to show.
function sendSafeNames(formData) {
  const files = formData.getAll("photos").filter((file) => file instanceof File && file.name);
  formData.delete("photos");
  formData.delete("names");
  files.forEach((file, index) => {
    const extension = /\.[a-z0-9]{1,5}$/i.exec(file.name)?.[0] ?? "";
    formData.append("photos", file, `photo-${index + 1}${extension.toLowerCase()}`);
    formData.append("names", file.name);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.body.addEventListener("dragover", (event) => {
    if (event.target.closest(".dropzone")) event.preventDefault();
  });
  document.body.addEventListener("drop", (event) => {
    const zone = event.target.closest(".dropzone");
    if (!zone) return;
    event.preventDefault();
    const input = zone.querySelector("input[type=file]");
    const files = new DataTransfer();
    for (const file of event.dataTransfer.files) files.items.add(file);
    input.files = files.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });
  document.body.addEventListener("change", (event) => {
    if (!event.target.matches(".upload input[type=file]")) return;
    const input = event.target;
    if (!checkRoom(input)) input.reportValidity();
    const previews = input.closest("form").querySelector(".previews");
    previews.replaceChildren(...Array.from(input.files).map((file) => {
      const image = document.createElement("img");
      image.src = URL.createObjectURL(file);
      image.alt = file.name;
      return image;
    }));
  });
  document.body.addEventListener("htmx:configRequest", (event) => {
    if (event.detail.elt.matches(".upload")) sendSafeNames(event.detail.formData);
  });
  // Checked again as htmx sends: files chosen before this script ran raised no change event here.
  document.body.addEventListener("htmx:beforeRequest", (event) => {
    const input = event.detail.elt.matches(".upload") && event.detail.elt.querySelector("input[type=file]");
    if (input && !checkRoom(input)) {
      event.preventDefault();
      input.reportValidity();
    }
  });
});
