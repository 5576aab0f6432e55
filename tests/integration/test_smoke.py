"""The simplest end-to-end case: a small image with data, zeros and holes."""
from conftest import assert_image_reads_like_qemu, qemu_img, qemu_io


def test_small_image_reads_like_qemu(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "64M")
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x22 5M 100k",
            "write -z 10M 1M")
    assert_image_reads_like_qemu(img, tmp_path)
