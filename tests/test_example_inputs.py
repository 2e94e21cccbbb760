"""example_inputs.py: the example workflows' images reach ComfyUI's input folder when the pack loads, and a user's
file of the same name is never replaced."""
import example_inputs
from support.host import ROOT


def test_a_real_server_has_the_example_images_in_its_input_folder(comfy_server):
    for name, asset in example_inputs.EXAMPLE_INPUTS.items():
        copied = comfy_server.base / "input" / name
        assert copied.read_bytes() == (ROOT / "assets" / asset).read_bytes(), name
    # and LoadImage offers them
    options = comfy_server.client.object_info()["LoadImage"]["input"]["required"]["image"][0]
    assert set(example_inputs.EXAMPLE_INPUTS) <= set(options)


def test_existing_files_are_kept_and_missing_ones_copied(tmp_path):
    mine = tmp_path / "invadapter_example_face.png"
    mine.write_bytes(b"my own photo")
    copied = example_inputs.install_example_inputs(str(tmp_path))
    assert mine.read_bytes() == b"my own photo"
    assert copied == [str(tmp_path / "invadapter_example_face_2.png"), str(tmp_path / "invadapter_example_pose.png")]
    assert example_inputs.install_example_inputs(str(tmp_path)) == []


def test_an_unwritable_folder_costs_a_warning_not_the_pack(tmp_path, caplog):
    blocked = tmp_path / "input"
    blocked.write_text("a file where the folder should be")
    assert example_inputs.install_example_inputs(str(blocked)) == []
    assert "upload face.png, face2.png, pose.png" in caplog.text
