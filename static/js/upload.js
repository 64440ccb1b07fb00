// Drag and drop onto the upload form, with previews before sending. The form works without it.
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
    // More files than the double has room for are refused here, with the server's words.
    input.setCustomValidity(input.files.length > Number(input.dataset.room) ? input.dataset.tooMany : "");
    input.reportValidity();
    const previews = input.closest("form").querySelector(".previews");
    previews.replaceChildren(...Array.from(input.files).map((file) => {
      const image = document.createElement("img");
      image.src = URL.createObjectURL(file);
      image.alt = file.name;
      return image;
    }));
  });
});
