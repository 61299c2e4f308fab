// The settings form: read it into a plain object, turn that into a jobs-API request, put a saved one back,
// and show the server's error messages next to the control they concern.

const $ = (id) => document.getElementById(id);

export const PRESETS = ["1024x1024", "832x1216", "1216x832"];
const SEED_MAX = 2n ** 64n - 1n;

export function randomSeed() {
  // 53 random bits are plenty and stay exact in a JSON number.
  const [hi, lo] = crypto.getRandomValues(new Uint32Array(2));
  return String((hi & 0x1fffff) * 2 ** 32 + lo);
}

export function syncSize() {
  const preset = $("size-preset").value;
  const custom = preset === "custom";
  $("width").readOnly = !custom;
  $("height").readOnly = !custom;
  if (!custom) [$("width").value, $("height").value] = preset.split("x");
}

export function setSize(width, height) {
  const key = `${width}x${height}`;
  $("size-preset").value = PRESETS.includes(key) ? key : "custom";
  $("width").value = width;
  $("height").value = height;
  syncSize();
}

export function syncSeed() {
  // Random: the box is off and empty (a new seed is drawn per Generate); Fixed: it holds the seed,
  // the last one used if nothing was typed.
  const fixed = $("seed-fixed").checked;
  $("seed").disabled = !fixed;
  if (fixed && !$("seed").value) $("seed").value = $("last-seed").value || "0";
  if (!fixed) $("seed").value = "";
}

function number(id) {
  const v = $(id).valueAsNumber;
  return Number.isFinite(v) ? v : $(id).value; // a non-number goes to the server, which says what is wrong
}

export function read(loras) {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    guidance: number("guidance"),
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    n: number("n"),
    seed_mode: $("seed-fixed").checked ? "fixed" : "random",
    seed: $("seed").value.trim(),
    loras,
    strength: number("strength"),
    hires: $("hires").checked,
    control_scale: number("control-scale"),
  };
}

export function write(s) {
  $("prompt").value = s.prompt;
  $("negative_prompt").value = s.negative_prompt;
  $("guidance").value = s.guidance;
  setSize(s.width, s.height);
  $("steps").value = s.steps;
  $("n").value = s.n;
  $("seed-fixed").checked = true; // a restored image is only reproduced with its own seed
  $("seed").value = s.seed;
  syncSeed();
  $("strength").value = s.strength;
  $("strength-out").value = Number(s.strength).toFixed(2);
  $("hires").checked = s.hires;
  $("control-scale").value = s.control_scale;
  $("control-scale-out").value = Number(s.control_scale).toFixed(2);
}

export function checkSeed(seed) {
  // The one check made here: a seed the server would read differently than typed (above 2^53) is kept
  // as a string of digits; anything else is the server's to judge.
  if (!/^\d+$/.test(seed) || BigInt(seed) > SEED_MAX) return "The seed is a whole number from 0 to 2^64-1.";
  return null;
}

export function request(s, model) {
  // The jobs-API request for settings `s` (seed already chosen); images are added by the caller.
  const body = {
    prompt: s.prompt,
    size: `${s.width}x${s.height}`,
    steps: s.steps,
    n: s.n,
    seed: Number(s.seed) <= Number.MAX_SAFE_INTEGER ? Number(s.seed) : s.seed,
    response_format: "url", // the jobs API keeps every image as a file; base64 would only be dropped
  };
  if (model.variant === "base") {
    body.negative_prompt = s.negative_prompt;
    body.guidance = s.guidance;
  }
  const loras = s.loras.filter((l) => l.enabled).map((l) => ({ name: l.name, scale: l.scale }));
  if (loras.length) body.loras = loras;
  if (s.hires) body.hires = { scale: 1.5 };
  return body;
}

// Where each request field's error goes; a field the page does not know lands under the Generate button.
const ERROR_SLOT = {
  prompt: "prompt-error",
  negative_prompt: "negative_prompt-error",
  guidance: "guidance-error",
  size: "size-error",
  width: "size-error",
  height: "size-error",
  steps: "steps-error",
  n: "n-error",
  seed: "seed-error",
  loras: "loras-error",
  image: "image-error",
  mask: "mask-error",
  strength: "strength-error",
  hires: "hires-error",
  control_image: "control_image-error",
  control_scale: "control_image-error",
  api_key: "api-key-error",
};

const CONTROL_OF = {
  "size-error": ["width", "height", "size-preset"],
  "prompt-error": ["prompt"],
  "negative_prompt-error": ["negative_prompt"],
  "guidance-error": ["guidance"],
  "steps-error": ["steps"],
  "n-error": ["n"],
  "seed-error": ["seed"],
  "image-error": ["init-image"],
  "strength-error": ["strength"],
  "hires-error": ["hires"],
  "control_image-error": ["control-image"],
  "api-key-error": ["api-key"],
};

export function slotFor(param) {
  // FastAPI and OpenAI spell a field "size", "body.size", "loras[0].name" or "image[]".
  for (const part of String(param || "").split(/[^a-z_]+/)) {
    if (ERROR_SLOT[part]) return ERROR_SLOT[part];
  }
  return "form-error";
}

export function showError(param, message) {
  const slot = slotFor(param);
  const el = $(slot);
  el.textContent = message;
  el.hidden = false;
  for (const id of CONTROL_OF[slot] || []) {
    $(id).setAttribute("aria-invalid", "true");
    $(id).setAttribute("aria-describedby", slot);
  }
  const focusable = (CONTROL_OF[slot] || []).map($).find((c) => c && !c.disabled && !c.readOnly);
  if (focusable) focusable.focus();
  return el;
}

export function clearErrors() {
  for (const el of document.querySelectorAll(".error")) {
    el.hidden = true;
    el.textContent = "";
  }
  for (const el of document.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    el.removeAttribute("aria-describedby");
  }
}
