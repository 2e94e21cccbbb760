// How this pack's templates appear in the template browser. Cosmetic: without this file the same templates are
// listed and open, in file-system order and fitted to the window.
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/
import { api } from "../../../scripts/api.js";

// /workflow_templates names a pack by its folder in custom_nodes, as /extensions/<pack>/ does
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2]);

// The browser's default sort keeps a pack's templates in the order the server lists them, which is the order its
// file system returns (ComfyUI globs example_workflows/ unsorted). Ours are numbered in the order a newcomer should
// meet them ("01 - Face photo to image", ...): sort this pack's list by name before the browser sees it.
const listTemplates = api.getWorkflowTemplates.bind(api);
api.getWorkflowTemplates = async () => {
  const templates = await listTemplates();
  if (Array.isArray(templates?.[PACK])) templates[PACK] = [...templates[PACK]].sort();
  return templates;
};

// A template opens fitted to the window whatever view it saved (loadGraphData ignores extra.ds for templates): a
// whole graph of the pack then opens at about 30 %, below the zoom at which the frontend draws any text. Ours save
// a view at a legible zoom with the Start here note in it (scripts/workflow_layout.py, open_view); restore it, as
// the frontend itself does for a workflow opened from a file.
app.registerExtension({
  name: "InvAdapter.TemplateView",
  afterConfigureGraph() {
    const ds = app.graph?.extra?.ds;
    const canvas = app.canvas;
    if (!ds?.offset || !ds.scale || !canvas) return;
    if (app.extensionManager?.setting?.get?.("Comfy.EnableWorkflowViewRestore") === false) return;
    if (!app.graph._nodes?.some((node) => node.type?.startsWith("InvAdapter"))) return;
    canvas.ds.scale = ds.scale;
    canvas.ds.offset[0] = ds.offset[0];
    canvas.ds.offset[1] = ds.offset[1];
    canvas.setDirty(true, true);
  },
});
