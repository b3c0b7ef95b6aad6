// DreamBooth Load Subject: the chosen subject's preview picture and phrase on the node (from
// GET /dreambooth/subjects, which reads the files' metadata), and the node's base-model warning after
// it runs (its "text" output). Nothing here is saved with the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LOAD_SUBJECT = "DreamBoothLoadSubject";

async function subjects() {
  try {
    const resp = await api.fetchApi("/dreambooth/subjects", { cache: "no-store" });
    return resp.ok ? (await resp.json()).subjects : [];
  } catch {
    return [];
  }
}

function attach(node) {
  const el = document.createElement("div");
  el.style.cssText = "display:flex;gap:6px;align-items:center;font:11px sans-serif;overflow:hidden";
  const img = document.createElement("img");
  img.style.cssText = "width:64px;height:64px;object-fit:cover;border-radius:4px;flex:none";
  const text = document.createElement("div");
  text.style.cssText = "overflow:hidden;color:var(--input-text,#ddd)";
  el.append(img, text);
  const widget = node.addDOMWidget("dreambooth_subject", "dreambooth_subject", el, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 72, getMaxHeight: () => 72,
  });
  widget.serialize = false;  // not part of the workflow's widgets_values
  let warning = "";
  const show = async () => {
    const name = node.widgets?.find((w) => w.name === "subject")?.value;
    const s = (await subjects()).find((x) => x.name === name);
    img.src = s?.thumbnail || "";
    img.style.visibility = s?.thumbnail ? "visible" : "hidden";
    text.textContent = warning || (s ? `${s.phrase} (${s.family || "base unknown"})` : "no subject chosen");
    text.style.color = warning ? "#f6a53c" : "var(--input-text,#ddd)";
    el.dataset.phrase = s?.phrase || "";
  };
  const combo = node.widgets?.find((w) => w.name === "subject");
  if (combo) {
    const picked = combo.callback;
    combo.callback = function () { warning = ""; show(); return picked?.apply(this, arguments); };
  }
  const executed = node.onExecuted;
  node.onExecuted = function (message) {
    const line = message?.text?.[0] || "";
    warning = line.startsWith("warning: ") ? line : "";
    show();
    return executed?.apply(this, arguments);
  };
  node.dreamboothShowSubject = show;
  show();
}

app.registerExtension({
  name: "dreambooth.subject",
  async nodeCreated(node) {
    const cls = node.comfyClass || node.constructor?.comfyClass;
    if (cls === LOAD_SUBJECT) attach(node);
  },
  loadedGraphNode(node) {
    node.dreamboothShowSubject?.();  // a loaded workflow set the combo after the node was created
  },
});
