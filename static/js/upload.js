// Drag and drop onto the upload form, with previews before sending. The form works without it.

// More files than the double has room for are refused in the browser, with the server's words:
// past Django's own limit the server could only answer a bare 400. False when there are too many.
function checkRoom(input) {
  const tooMany = input.files.length > Number(input.dataset.room);
  input.setCustomValidity(tooMany ? input.dataset.tooMany : "");
  return !tooMany;
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
  // Checked again as htmx sends: files chosen before this script ran raised no change event here.
  document.body.addEventListener("htmx:beforeRequest", (event) => {
    const input = event.detail.elt.matches(".upload") && event.detail.elt.querySelector("input[type=file]");
    if (input && !checkRoom(input)) {
      event.preventDefault();
      input.reportValidity();
    }
  });
});
