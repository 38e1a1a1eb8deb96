"""Reference image handling, collation and size checks."""

import pytest
import torch
from PIL import Image

from bindweave.model.batch import (
    MAX_UPSCALE, check_num_frames, check_spatial_size, collate, fit_reference, reference_warnings, to_rgb,
)
from bindweave.data.video_io import read_video, write_video


def test_rgba_and_grey_references_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # composited on white
    opaque = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert to_rgb(opaque).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    with pytest.raises(ValueError, match="8-bit RGB"):
        to_rgb(Image.new("I;16", (4, 4)))


def test_fit_reference_keeps_aspect_and_marks_the_subject():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    tensor, mask = fit_reference(image, 32, 32)
    assert tensor.shape == (3, 32, 32) and mask.shape == (32, 32)
    assert mask.sum() == 32 * 16  # 20x10 scaled to 32x16, centred
    assert tensor[:, mask].max() == -1 and tensor[:, ~mask].min() == 1


def test_reference_warnings_name_odd_modes_blank_images_and_large_upscales():
    for ordinary in (Image.new("RGB", (40, 30)), Image.new("RGBA", (40, 30), (255, 0, 0, 128)), Image.new("L", (8, 8))):
        assert reference_warnings(ordinary, 32, 32) == [], ordinary.mode  # 8x8 -> 32x32 is exactly 4x: fine
    assert MAX_UPSCALE == 4
    cmyk, = reference_warnings(Image.new("CMYK", (32, 32)), 32, 32)
    assert cmyk.startswith("CMYK, converted to RGB without its colour profile")
    assert "palette image" in reference_warnings(Image.new("RGB", (32, 32)).convert("P"), 32, 32)[0]
    assert "1 bit per pixel" in reference_warnings(Image.new("1", (32, 32)), 32, 32)[0]
    assert "blank white image" in reference_warnings(Image.new("RGBA", (32, 32), (255, 0, 0, 0)), 32, 32)[0]
    tiny, = reference_warnings(Image.new("RGB", (3, 3)), 480, 832)
    assert tiny == ("3x3 pixels, enlarged 160.0x to fit the 832x480 video (more than 4x: expect a blurred subject); "
                    "give one of at least 120x120 pixels")
    assert reference_warnings(Image.new("RGB", (120, 120)), 480, 832) == []  # the size it asks for is enough
    assert reference_warnings(Image.new("RGB", (1000, 7)), 480, 832) == []  # fitted by its width: shrunk


def test_collate_pads_references_and_counts_them():
    samples = [{"prompt": "a", "references": torch.ones(1, 3, 8, 8)}, {"prompt": "b", "references": torch.ones(3, 3, 8, 8)}]
    batch = collate(samples)
    assert batch["references"].shape == (2, 3, 3, 8, 8)
    assert batch["num_references"] == [1, 3]
    assert batch["references"][0, 1:].abs().max() == 0
    assert batch["prompt"] == ["a", "b"]


def test_size_checks_name_the_fix():
    check_num_frames(81)
    with pytest.raises(ValueError, match="Use 77 or 81"):
        check_num_frames(80)
    check_spatial_size(480, 832, 16)
    with pytest.raises(ValueError, match="Use 720"):
        check_spatial_size(721, 832, 16)


def test_video_round_trip_is_atomic(tmp_path):
    frames = torch.randint(0, 255, (5, 32, 32, 3), dtype=torch.uint8)
    path = write_video(tmp_path / "v.mp4", frames, fps=8)
    decoded = read_video(path)
    assert decoded.shape == (5, 32, 32, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary files left
    with pytest.raises(ValueError):
        write_video(tmp_path / "bad.mp4", frames.float())
    assert not (tmp_path / "bad.mp4").exists()
