"""Reading a page's attention-map overlay back in headless Chromium (the viewer's and the demo's tests)."""

from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def launch_chromium(playwright_module: str = "playwright.sync_api"):
    """A context manager yielding a headless Chromium; skips the test where Chromium or Playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the browser tests need it")
    sync_api = pytest.importorskip(playwright_module, reason="playwright is missing (pip install playwright)")

    class Browser:
        def __enter__(self):
            self.playwright = sync_api.sync_playwright().start()
            return self.playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)

        def __exit__(self, *exc):
            self.playwright.stop()

    return Browser()


def colour_values(rgb: np.ndarray) -> np.ndarray:
    """Invert the page's colour map (map_export's): RGB (H, W, 3) -> values in [0, 1]."""
    from diffusion.maps.export import colormap

    levels = np.linspace(0, 1, 2001)
    table = colormap(levels).astype(np.int32)  # (L, 3)
    distances = ((rgb.reshape(-1, 1, 3).astype(np.int32) - table[None]) ** 2).sum(-1)
    return levels[distances.argmin(1)].reshape(rgb.shape[:2])


def canvas_pixels(canvas) -> np.ndarray:
    """A canvas's own pixels, RGB (H, W, 3) uint8."""
    width, height, pixels = canvas.evaluate(
        "c => [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]"
    )
    return np.array(pixels, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def shown_map(card) -> np.ndarray:
    """What the card's overlay canvas shows, read back from its pixels, as values in [0, 1]."""
    canvas = card.locator("canvas.overlay")
    assert canvas.is_visible()
    return colour_values(canvas_pixels(canvas))


def assert_shows(card, expected: np.ndarray) -> None:
    """The overlay is `expected` scaled to its own peak (the page's default colour scale)."""
    shown = shown_map(card)
    assert shown.shape == expected.shape
    expected = expected / expected.max()
    np.testing.assert_allclose(shown, expected, atol=0.02)
    # Where the page is brightest the word acted most (maps of a barely trained model are nearly flat:
    # near-ties of the argmax are allowed), and the ranking of pixels is the array's.
    assert expected.flat[shown.argmax()] > 0.98
    assert np.corrcoef(shown.ravel(), expected.ravel())[0, 1] > 0.99
