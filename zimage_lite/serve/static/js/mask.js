// Mask painting on a canvas laid over the init image. The canvas has the image's own pixel size and holds
// the mask in its alpha: painted (re-generate) opaque, kept transparent; the paint is shown in a colour that
// stands out on any picture. It is exported in OpenAI's convention (see blob()); the server turns that into
// the CLI's white = re-generate.

const INK = "#ff2d55";

export class MaskPainter {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.brush = 40; // in image pixels
    this.erase = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointercancel"]) canvas.addEventListener(name, () => (this.last = null));
  }

  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  point(e) {
    // pointer position in canvas pixels: the canvas is scaled by CSS to the width of the preview
    const box = this.canvas.getBoundingClientRect();
    return [
      ((e.clientX - box.left) / box.width) * this.canvas.width,
      ((e.clientY - box.top) / box.height) * this.canvas.height,
    ];
  }

  down(e) {
    if (e.button !== 0) return;
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
    e.preventDefault();
  }

  move(e) {
    if (this.last === null) return;
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  stroke([x0, y0], [x1, y1]) {
    const c = this.ctx;
    c.globalCompositeOperation = this.erase ? "destination-out" : "source-over";
    c.strokeStyle = INK;
    c.lineCap = "round";
    c.lineJoin = "round";
    c.lineWidth = this.brush;
    c.beginPath();
    c.moveTo(x0, y0);
    c.lineTo(x1 + 0.01, y1); // a zero-length line draws nothing; a click should leave a dot
    c.stroke();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  invert() {
    const c = this.ctx;
    c.globalCompositeOperation = "xor";
    c.fillStyle = INK;
    c.fillRect(0, 0, this.canvas.width, this.canvas.height);
    c.globalCompositeOperation = "source-over";
  }

  painted() {
    const { width, height } = this.canvas;
    if (!width || !height) return false;
    const alpha = this.ctx.getImageData(0, 0, width, height).data;
    for (let i = 3; i < alpha.length; i += 4) if (alpha[i] >= 128) return true;
    return false;
  }

  snapshot() {
    return this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
  }

  restore(data) {
    this.reset(data.width, data.height);
    this.ctx.putImageData(data, 0, 0);
  }

  blob() {
    // OpenAI's mask convention, which the jobs API takes: the init image's size, transparent where the
    // image is re-generated (painted), opaque black where it is kept.
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const c = out.getContext("2d");
    c.fillStyle = "#000";
    c.fillRect(0, 0, out.width, out.height);
    c.globalCompositeOperation = "destination-out"; // the paint cuts holes
    c.drawImage(this.canvas, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }
}
