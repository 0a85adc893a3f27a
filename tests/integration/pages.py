"""Page data and filled regions for the integration tests: random pages (stored raw)
and text pages (compressible), as real memory has both."""
import numpy as np

from ufcram import PAGE_SIZE, Region


def random_pages(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE_SIZE), np.uint8)


def text_pages(n, seed=0):
    rng = np.random.default_rng(seed)
    words = np.frombuffer(b"lorem ipsum dolor sit amet consectetur adipiscing elit ", np.uint8)
    return rng.choice(words, (n, PAGE_SIZE))


def filled(node, data, **kw):
    r = Region(data.size, node=node, **kw)
    a = r.array(np.uint8, data.shape)
    a[:] = data
    return r, a
