// A JPEG's EXIF orientation (1-8; 1 = stored upright). Browsers show a photo turned by it, PIL on the server
// reads the stored pixels; the page sends an upright copy when the two differ, so what is painted is what
// is generated. Reads only the APP1 segment's first IFD (TIFF header, either byte order).

export async function orientation(blob) {
  const view = new DataView(await blob.slice(0, 128 * 1024).arrayBuffer());
  if (view.byteLength < 4 || view.getUint16(0) !== 0xffd8) return 1; // not a JPEG
  let at = 2;
  while (at + 4 <= view.byteLength) {
    const marker = view.getUint16(at);
    const length = view.getUint16(at + 2);
    if (marker === 0xffe1 && at + 10 <= view.byteLength && view.getUint32(at + 4) === 0x45786966) {
      return fromTiff(view, at + 10); // "Exif\0\0", then the TIFF header
    }
    if ((marker & 0xff00) !== 0xff00 || marker === 0xffda) return 1; // bad marker, or the image data
    at += 2 + length;
  }
  return 1;
}

function fromTiff(view, tiff) {
  if (tiff + 8 > view.byteLength) return 1;
  const little = view.getUint16(tiff) === 0x4949; // "II"
  const ifd = tiff + view.getUint32(tiff + 4, little);
  if (ifd + 2 > view.byteLength) return 1;
  const count = view.getUint16(ifd, little);
  for (let i = 0; i < count; i++) {
    const entry = ifd + 2 + i * 12; // tag, type, count, value: 12 bytes
    if (entry + 12 > view.byteLength) return 1;
    if (view.getUint16(entry, little) === 0x0112) {
      const value = view.getUint16(entry + 8, little);
      return value >= 1 && value <= 8 ? value : 1;
    }
  }
  return 1;
}

export async function upright(bitmap) {
  // the bitmap as the browser shows it (createImageBitmap applies the orientation), re-encoded; JPEG at
  // 0.95 keeps a photo's upload small (its source was a JPEG already)
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.95));
}
