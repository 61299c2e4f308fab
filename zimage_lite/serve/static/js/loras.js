// The LoRAs the server found in --lora-dir: one checkbox and one scale per file.

function slug(name) {
  return name.replace(/[^A-Za-z0-9_-]/g, "_");
}

export function loraList(container, loras) {
  container.replaceChildren();
  for (const lora of loras) {
    const name = typeof lora === "string" ? lora : lora.name;
    const id = `lora-${slug(name)}`;
    const row = document.createElement("div");
    row.className = "row lora";
    row.dataset.name = name;
    row.innerHTML = `<input type="checkbox" id="${id}">
      <label for="${id}"></label>
      <label for="${id}-scale" class="scale-label">scale</label>
      <input type="number" id="${id}-scale" min="-4" max="4" step="0.05" value="1" inputmode="decimal">`;
    row.querySelector(`label[for="${id}"]`).textContent = name; // a file name is text, never markup
    row.querySelector(".scale-label").textContent = `${name} scale`;
    row.querySelector(".scale-label").classList.add("sr-only");
    container.append(row);
  }
}

export function readLoras(container) {
  return [...container.querySelectorAll(".lora")].map((row) => {
    const [enabled, scale] = row.querySelectorAll("input");
    return { name: row.dataset.name, enabled: enabled.checked, scale: scale.valueAsNumber };
  });
}

export function writeLoras(container, loras) {
  const saved = new Map(loras.map((l) => [l.name, l]));
  for (const row of container.querySelectorAll(".lora")) {
    const [enabled, scale] = row.querySelectorAll("input");
    const l = saved.get(row.dataset.name);
    enabled.checked = Boolean(l && l.enabled);
    if (l) scale.value = l.scale;
  }
}
