// Minimal DOM stub: enough for the chatmesh page's script.
class El {
  constructor(tag) { this.tagName = tag.toUpperCase(); this.childNodes = []; this._text = ""; this.className = "";
    this.style = {}; this.dataset = {}; this.value = ""; this.listeners = {}; this.scrollTop = 0; this.clientHeight = 100; this.scrollHeight = 100;
    const self = this;
    this.classList = { add(c) { self.cls.add(c); }, remove(c) { self.cls.delete(c); }, toggle(c, on) { if (on) self.cls.add(c); else self.cls.delete(c); }, contains(c) { return self.cls.has(c); } };
    this.cls = new Set(); }
  get textContent() { return this.tagName === "#TEXT" ? this._text : (this._text + this.childNodes.map((c) => c.textContent).join("")); }
  set textContent(t) { this._text = String(t); this.childNodes = []; }
  set innerHTML(t) { throw new Error("innerHTML used"); }
  get firstChild() { return this.childNodes[0]; }
  appendChild(c) { this.childNodes.push(c); return c; }
  removeChild(c) { this.childNodes.splice(this.childNodes.indexOf(c), 1); }
  replaceChildren() { this.childNodes = []; this._text = ""; }
  addEventListener(t, f) { (this.listeners[t] ||= []).push(f); }
  fire(t) { for (const f of this.listeners[t] || []) f({ preventDefault() {} }); }
  focus() {}
  querySelectorAll(sel) { const out = []; const walk = (e) => { for (const c of e.childNodes) { if (c.tagName === sel.toUpperCase()) out.push(c); walk(c); } }; walk(this); return out; }
}
const els = {};
global.document = {
  getElementById(id) { return els[id] ||= new El("div"); },
  createElement(tag) { return new El(tag); },
  createTextNode(t) { const e = new El("#text"); e._text = String(t); return e; },
};
global.els = els;
