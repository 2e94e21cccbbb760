// Front-end conveniences of ComfyUI-InvAdapter. Everything here is cosmetic: the nodes, the saved workflows and
// the API behave the same without it (headless users never load this file).
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/
import { api } from "../../../scripts/api.js";

// One colour per custom type, so an identity's path through a big graph is easy to follow. Each is at CIEDE2000 >= 20
// from every core type's colour in the default palette (its colours are bright pastels, so ours are saturated or
// mid-dark) and > 10 in every other palette the frontend ships (tests/test_frontend_extension.py checks both).
export const LINK_COLORS = {
  INVADAPTER: "#D916FE",
  INVADAPTER_REFERENCE: "#9A8005",
  INVADAPTER_BLOCK_WEIGHTS: "#85757F",
  INVADAPTER_FACE_BOXES: "#28849D",
  INVADAPTER_FACE_SCORES: "#308958",
};

const BLOCK_WEIGHTS_NODE = "InvAdapterBlockWeights";
const isLevelSlider = (widget) => /^(self|cross|dit)_/.test(widget.name);

function applyLinkColors() {
  // Loading a colour palette resets every type's colour, ours included: this runs again after each palette change
  // and each graph load.
  const byType = app.canvas?.default_connection_color_byType;
  const linkTypeColors = window.LGraphCanvas?.link_type_colors ?? window.LiteGraph?.LGraphCanvas?.link_type_colors;
  const style = document.documentElement?.style;  // the slot colours of the "Nodes 2.0" (Vue) node design
  for (const [type, color] of Object.entries(LINK_COLORS)) {
    if (byType && !byType[type]) byType[type] = color;
    if (linkTypeColors && !linkTypeColors[type]) linkTypeColors[type] = color;
    style?.setProperty(`--color-datatype-${type}`, color);
  }
  app.canvas?.setDirty?.(true, true);
}

// The 19 per-level sliders (UNet and MM-DiT levels) only matter with preset "custom": hide them otherwise. Hidden widgets keep their values,
// so the workflow JSON and the API prompt are the same either way.
function syncLevelSliders(node) {
  const preset = node.widgets?.find((w) => w.name === "preset");
  if (!preset) return;
  const hidden = preset.value !== "custom";
  for (const widget of node.widgets.filter(isLevelSlider)) {
    widget.hidden = hidden;
    if (widget.options) widget.options.hidden = hidden;
  }
  node.setSize([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas?.(true, true);
}

function watchPreset(node) {
  const preset = node.widgets?.find((w) => w.name === "preset");
  if (!preset || preset.invadapterWatched) return;
  const callback = preset.callback;
  preset.callback = function (...args) {
    const result = callback?.apply(this, args);
    syncLevelSliders(node);
    return result;
  };
  preset.invadapterWatched = true;
  syncLevelSliders(node);
}

// What the pack tells the user while a prompt runs (invadapter_core/notify.py: the same text is in the server log, the
// node's UI text and the websocket event): a toast, so it is seen where the user is looking.
function showNotice(event) {
  const { message, level } = event.detail ?? {};
  if (!message) return;
  app.extensionManager?.toast?.add({
    severity: level === "warning" ? "warn" : "info", summary: "Inv-Adapter", detail: message,
    life: level === "warning" ? 30000 : 10000,
  });
}

// After Save Reference writes a file, every reference list (Load Reference's combo, in the open graph and in new
// nodes) shows it without a page reload: the frontend's own refresh (what the R key does), without its toasts.
const SAVED_REFERENCE_KEY = "invadapter_saved_reference";  // nodes/reference_io.py's SAVED_UI_KEY

async function refreshAfterSave(event) {
  if (!event.detail?.output?.[SAVED_REFERENCE_KEY]) return;
  try {
    await (app.reloadNodeDefs ? app.reloadNodeDefs() : app.refreshComboInNodes());
  } catch (error) {
    console.warn("Inv-Adapter: could not refresh the saved reference list (press R to refresh it)", error);
  }
}

app.registerExtension({
  name: "InvAdapter.Frontend",
  setup() {
    api.addEventListener("invadapter.notice", showNotice);
    api.addEventListener("executed", refreshAfterSave);
    applyLinkColors();
    // the palette is loaded after the setting changes: apply ours once that has happened
    app.ui?.settings?.addEventListener?.("Comfy.ColorPalette.change", () => setTimeout(applyLinkColors, 0));
  },
  afterConfigureGraph() {
    applyLinkColors();
  },
  nodeCreated(node) {
    if (node.comfyClass === BLOCK_WEIGHTS_NODE) watchPreset(node);
  },
  loadedGraphNode(node) {
    // a loaded workflow sets the widget values after nodeCreated
    if (node.comfyClass === BLOCK_WEIGHTS_NODE) {
      watchPreset(node);
      syncLevelSliders(node);
    }
  },
});
