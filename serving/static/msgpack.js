// A small msgpack decoder for the playground: the types /v1/tts streams use (maps, arrays, strings,
// binary, integers, floats, nil, booleans), read from a byte stream that arrives in arbitrary pieces.
// Unused types (ext, timestamps) are refused with an error.
"use strict";

const MsgpackStream = (() => {
  const NEED_MORE = Symbol("need more bytes");
  const utf8 = new TextDecoder("utf-8");

  class Reader {
    constructor(bytes) {
      this.bytes = bytes;
      this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      this.pos = 0;
    }
    need(n) { if (this.pos + n > this.bytes.length) throw NEED_MORE; }
    u8() { this.need(1); return this.bytes[this.pos++]; }
    num(kind, size) {
      this.need(size);
      const v = this.view[kind](this.pos, false);
      this.pos += size;
      return v;
    }
    big(kind) {
      const v = this.num(kind, 8);
      return Number.isSafeInteger(Number(v)) ? Number(v) : v;
    }
    raw(n) {
      this.need(n);
      const out = this.bytes.slice(this.pos, this.pos + n);
      this.pos += n;
      return out;
    }
    str(n) { return utf8.decode(this.raw(n)); }
    array(n) { const out = []; for (let i = 0; i < n; i++) out.push(this.value()); return out; }
    map(n) {
      const out = {};
      for (let i = 0; i < n; i++) { const k = this.value(); out[k] = this.value(); }
      return out;
    }
    value() {
      const b = this.u8();
      if (b <= 0x7f) return b;
      if (b >= 0xe0) return b - 0x100;
      if ((b & 0xf0) === 0x80) return this.map(b & 0x0f);
      if ((b & 0xf0) === 0x90) return this.array(b & 0x0f);
      if ((b & 0xe0) === 0xa0) return this.str(b & 0x1f);
      switch (b) {
        case 0xc0: return null;
        case 0xc2: return false;
        case 0xc3: return true;
        case 0xc4: return this.raw(this.num("getUint8", 1));
        case 0xc5: return this.raw(this.num("getUint16", 2));
        case 0xc6: return this.raw(this.num("getUint32", 4));
        case 0xca: return this.num("getFloat32", 4);
        case 0xcb: return this.num("getFloat64", 8);
        case 0xcc: return this.num("getUint8", 1);
        case 0xcd: return this.num("getUint16", 2);
        case 0xce: return this.num("getUint32", 4);
        case 0xcf: return this.big("getBigUint64");
        case 0xd0: return this.num("getInt8", 1);
        case 0xd1: return this.num("getInt16", 2);
        case 0xd2: return this.num("getInt32", 4);
        case 0xd3: return this.big("getBigInt64");
        case 0xd9: return this.str(this.num("getUint8", 1));
        case 0xda: return this.str(this.num("getUint16", 2));
        case 0xdb: return this.str(this.num("getUint32", 4));
        case 0xdc: return this.array(this.num("getUint16", 2));
        case 0xdd: return this.array(this.num("getUint32", 4));
        case 0xde: return this.map(this.num("getUint16", 2));
        case 0xdf: return this.map(this.num("getUint32", 4));
        default: throw new Error(`msgpack type 0x${b.toString(16)} is not used by this API`);
      }
    }
  }

  // Feed it the response body's pieces; it returns every whole object they complete.
  class Decoder {
    constructor() { this.pending = new Uint8Array(0); }
    push(piece) {
      const joined = new Uint8Array(this.pending.length + piece.length);
      joined.set(this.pending);
      joined.set(piece, this.pending.length);
      const reader = new Reader(joined);
      const objects = [];
      let done = 0;
      for (;;) {
        try {
          objects.push(reader.value());
          done = reader.pos;
        } catch (e) {
          if (e !== NEED_MORE) throw e;
          break;
        }
        if (done === joined.length) break;
      }
      this.pending = joined.slice(done);
      return objects;
    }
    get leftover() { return this.pending.length; }
  }

  return { Decoder, decode: (bytes) => new Reader(bytes).value() };
})();
