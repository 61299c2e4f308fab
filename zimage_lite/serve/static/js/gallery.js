// This session's images: the server's PNG bytes (downloads keep their metadata) with the settings that
// made them. Choosing one puts its settings back in the form.

export class Gallery {
  constructor(list, empty, onRestore) {
    this.list = list;
    this.empty = empty;
    this.onRestore = onRestore;
    this.entries = [];
  }

  add(entry) {
    // entry: {blob, settings, init, index}; newest first
    entry.url = URL.createObjectURL(entry.blob);
    this.entries.unshift(entry);
    this.list.prepend(this.item(entry));
    this.empty.hidden = true;
    return entry;
  }

  item(entry) {
    const s = entry.settings;
    const li = document.createElement("li");
    const restore = document.createElement("button");
    restore.type = "button";
    restore.className = "thumb";
    restore.title = "Use these settings";
    const img = document.createElement("img");
    img.src = entry.url;
    img.alt = `Restore the settings of: ${s.prompt}`;
    restore.append(img);
    restore.addEventListener("click", () => this.onRestore(entry));

    const caption = document.createElement("p");
    caption.className = "caption";
    caption.title = describe(s, entry.index);
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = s.prompt;
    caption.append(prompt, settingsText(s, entry.index));
    const download = document.createElement("a");
    download.href = entry.url;
    download.download = `zimage-${s.seed}-${entry.index}.png`;
    download.textContent = "Download PNG";
    download.className = "download";
    li.append(restore, caption, download);
    return li;
  }
}

export function settingsText(s, index = 0) {
  const parts = [`${s.width}×${s.height}`, `${s.steps} steps`, `seed ${s.seed}`];
  if (s.n > 1) parts.push(`image ${index + 1} of ${s.n}`);
  if (s.hires) parts.push("hires");
  const loras = s.loras.filter((l) => l.enabled);
  if (loras.length) parts.push(loras.map((l) => `${l.name} ${l.scale}`).join(", "));
  return parts.join(", ");
}

export function describe(s, index = 0) {
  return `${s.prompt} — ${settingsText(s, index)}`;
}
