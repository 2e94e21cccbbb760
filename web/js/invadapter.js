// Front-end conveniences of ComfyUI-InvAdapter. Everything here is cosmetic: the nodes, the saved workflows and
// the API behave the same without it (headless users never load this file).
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/

// One colour per custom type, so an identity's path through a big graph is easy to follow.
export const LINK_COLORS = {
  INVADAPTER: "#B39DDB",
  INVADAPTER_REFERENCE: "#F4A261",
  INVADAPTER_BLOCK_WEIGHTS: "#90BE6D",
  INVADAPTER_FACE_BOXES: "#4CC9F0",
};

const BLOCK_WEIGHTS_NODE = "InvAdapterBlockWeights";
const isLevelSlider = (widget) => /^(self|cross)_/.test(widget.name);

function applyLinkColors() {
  // A colour palette change resets every type's colour, so this runs again after each graph load.
  const byType = app.canvas?.default_connection_color_byType;
  const linkTypeColors = window.LGraphCanvas?.link_type_colors ?? window.LiteGraph?.LGraphCanvas?.link_type_colors;
  for (const [type, color] of Object.entries(LINK_COLORS)) {
    if (byType && !byType[type]) byType[type] = color;
    if (linkTypeColors && !linkTypeColors[type]) linkTypeColors[type] = color;
  }
}

// The 14 per-level sliders only matter with preset "custom": hide them otherwise. Hidden widgets keep their values,
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

app.registerExtension({
  name: "InvAdapter.Frontend",
  setup() {
    applyLinkColors();
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
