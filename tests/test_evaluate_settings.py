"""The evaluation's defaults are the nodes' own: every Settings field passed to a pack node's widget defaults to that
widget's default (a changed node default cannot leave the CLI evaluating something else)."""
from invadapter_core.evaluate.pipeline import CROP_SIZE_FAMILY_DEFAULT, INIT_FROM_MODEL, Config, Generator, Nodes, \
    Settings

# widgets the evaluation sets on purpose to something other than the node's default, and why
CHOSEN = {("InvAdapterFaceCrop", "device"): "the recognizer and the crop run where ComfyUI runs the model",
          ("InvAdapterFaceCrop", "size"): "the crop follows the reference resolution (the family's own when 0)"}


def test_settings_defaults_are_the_node_widget_defaults():
    nodes, s = Nodes(), Settings()
    widgets = {"InvAdapterFaceCrop": Generator._crop_widgets(s),
               "InvAdapterEncodeReference": Generator._encode_widgets(s),
               "InvAdapterApply": Generator._apply_widgets(s, Config(INIT_FROM_MODEL, 1.0, 1.0, "none"))}
    compared = 0
    for node_id, values in widgets.items():
        defaults = {i.id: getattr(i, "default", None) for i in nodes.pack[node_id].define_schema().inputs}
        for key, value in values.items():
            if (node_id, key) in CHOSEN or key in ("weight_self", "weight_cross"):  # the grid's, not a setting
                continue
            assert value == defaults[key], f"{node_id}.{key}: the evaluation uses {value!r}, the node {defaults[key]!r}"
            compared += 1
    assert compared >= 12
    assert Generator._crop_widgets(s)["size"] == CROP_SIZE_FAMILY_DEFAULT
