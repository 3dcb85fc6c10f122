"""The one image tiler."""

from PIL import Image

from diffusion.images import tile


def test_tiles_fill_rows_and_size_each_column_and_row_to_its_largest():
    red, blue = Image.new("RGB", (2, 3), "red"), Image.new("RGB", (4, 1), "blue")
    grid = tile([red, blue, blue], columns=2, background="black")
    assert grid.size == (4 + 4, 3 + 1)  # both columns 4 wide (a blue in each), rows 3 and 1 high
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((3, 0)) == (0, 0, 0)  # red, then background
    assert grid.getpixel((4, 0)) == (0, 0, 255) and grid.getpixel((0, 3)) == (0, 0, 255)
    assert grid.getpixel((7, 3)) == (0, 0, 0)  # the second row has one image
    assert tile([red] * 3, columns=3).size == (6, 3)  # equal images: a plain grid
