// The server's routes, as any client uses them (docs/serve-api.md): GET /v1/info, the jobs API and its
// Server-Sent Events. Nothing here knows about the page; the other modules reach the server only through it.

export class ApiError extends Error {
  // `param` names the request field the server refused (OpenAI's error shape), so the page can show the
  // message next to that control.
  constructor(message, { param = null, code = null, status = 0 } = {}) {
    super(message);
    this.param = param;
    this.code = code;
    this.status = status;
  }
}

export function fromBody(err, status = 0) {
  return new ApiError(err.message, { param: err.param, code: err.code, status });
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status line is all there is
  }
  if (body && body.error && body.error.message) return fromBody(body.error, response.status);
  return new ApiError(`the server answered ${response.status} ${response.statusText}`, {
    status: response.status,
  });
}

// With `serve --api-key`, every API route needs the key (the page's own files do not); it is kept for this
// tab only (sessionStorage), never in a URL.
const KEY_ITEM = "zimage-lite-api-key";

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

async function call(url, options = {}) {
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = { ...(options.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
  let response;
  try {
    response = await fetch(url, { ...options, headers });
  } catch (exc) {
    throw new ApiError(`the server cannot be reached (${exc.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function describe() {
  // {model, variant, loras, controlnet, defaults: {steps, size, ...}, limits: {max_n, max_steps, ...}}
  return (await call("/v1/info")).json();
}

export async function submit(request) {
  // The job as GET shows it ({id, state, position, seed, ...}), or ApiError naming the refused field.
  const options = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request) };
  return (await call("/v1/jobs", options)).json();
}

export async function cancel(id) {
  await call(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
}

function parseEvent(block) {
  // One SSE block ("event: x\ndata: {...}") -> [name, data]; comments and unknown fields are skipped.
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return [name, data.length ? JSON.parse(data.join("\n")) : null];
}

export async function follow(id, onEvent) {
  // Reads GET /v1/jobs/{id}/events: calls onEvent(name, data) for `queued` and `progress`, and returns the
  // final event's [name, data]: ["result", job] or ["error", {error, state}]. fetch rather than
  // EventSource: one stream that ends with the job, no silent reconnects.
  const response = await call(`/v1/jobs/${encodeURIComponent(id)}/events`, {
    headers: { Accept: "text/event-stream" },
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError("the server closed the progress stream before the job ended");
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const [name, data] = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (name === "result" || name === "error") {
        reader.cancel();
        return [name, data];
      }
      if (data) onEvent(name, data);
    }
  }
}

export async function imageBlob(result) {
  // The server's file, byte for byte, so a download keeps the PNG metadata it wrote.
  return (await call(result.url)).blob();
}
