"""The CPU path of the photometric augmentation (``hierdino.data.augment``): a few rows at a time,
depthwise-convolution blur. Checked against the whole-batch path, the GPU path's band-matrix blur,
scipy, and torchvision's functional colour ops."""

import numpy as np
import pytest
import torch

from hierdino.data import augment
from hierdino.data.augment import _blur_band, _draw, gaussian_blur, photometric


def test_cpu_blur_and_the_band_matrix_blur_match_scipy():
    """Both blur paths (CPU: depthwise convolutions; GPU: band matrices, run here on the CPU) against
    scipy's separable Gaussian filter with mirror borders, truncated at the same radius."""
    from scipy.ndimage import gaussian_filter1d

    x = torch.rand(3, 3, 24, 19, dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.1, 2.0], dtype=torch.float64)
    radius = 6  # ceil(3 * 2.0)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    for got in (gaussian_blur(x, sigma, max_sigma=2.0), _blur_band(x, k, radius)):
        for b in range(3):
            s = float(sigma[b])
            want = gaussian_filter1d(x[b].numpy(), s, axis=-1, mode="mirror", truncate=(radius + 0.25) / s)
            want = gaussian_filter1d(want, s, axis=-2, mode="mirror", truncate=(radius + 0.25) / s)
            np.testing.assert_allclose(got[b].numpy(), want, atol=1e-10)


@pytest.mark.parametrize("size", [16, 40])
def test_cpu_steps_give_the_whole_batch_result(monkeypatch, size):
    """Going a few rows at a time draws the same parameters and gives the same images as one step
    for the whole batch (which is what the GPU path does), per-row probabilities included."""
    x = torch.randint(0, 256, (13, size, size, 3), dtype=torch.uint8)
    kw = dict(blur_p=torch.rand(13), solarize_p=torch.rand(13), jitter=(0.4, 0.4, 0.2, torch.rand(13) * 0.1))
    monkeypatch.setattr(augment, "CPU_STEP_PIXELS", 10 ** 9)
    whole = photometric(x, torch.Generator().manual_seed(5), **kw)
    monkeypatch.setattr(augment, "CPU_STEP_PIXELS", 3 * size * size)  # steps of 3 rows, the last of 1
    steps = photometric(x, torch.Generator().manual_seed(5), **kw)
    assert torch.allclose(steps, whole, atol=1e-5)
    plain = photometric(x, torch.Generator().manual_seed(5), blur_p=0, jitter_p=0, gray_p=0, normalize=False)
    assert torch.allclose(plain, x.permute(0, 3, 1, 2).float() / 255)


def test_colour_jitter_matches_torchvision_and_a_yiq_hue_rotation():
    """Colour jitter on every row, nothing else: brightness, contrast and saturation as torchvision's
    ``adjust_*`` with the drawn factors, then the hue turned by the drawn angle in YIQ space (numpy,
    with its own matrix inverse), each step clipped to [0, 1]. torchvision's grey weights are
    (0.2989, 0.587, 0.114), ours (0.299, 0.587, 0.114): the tolerance covers that."""
    from torchvision.transforms import functional as TF

    n = 8
    x = torch.randint(0, 256, (n, 20, 20, 3), dtype=torch.uint8)
    opts = dict(blur_p=0.0, jitter_p=1.0, gray_p=0.0, normalize=False)
    got = photometric(x, torch.Generator().manual_seed(1), **opts)
    d = _draw(torch.Generator().manual_seed(1), n, 20, x.device, 0.0, 0.0, 1.0, 0.0, (0.4, 0.4, 0.2, 0.1))
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    for i in range(n):
        img = x[i].permute(2, 0, 1).float() / 255
        img = TF.adjust_brightness(img, float(d.brightness[i]))
        img = TF.adjust_contrast(img, float(d.contrast[i]))
        img = TF.adjust_saturation(img, float(d.saturation[i]))
        c, s = np.cos(float(d.hue[i])), np.sin(float(d.hue[i]))
        rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        m = np.linalg.inv(to_yiq) @ rot @ to_yiq
        want = np.clip(np.einsum("ij,jhw->ihw", m, img.double().numpy()), 0, 1)
        np.testing.assert_allclose(got[i].numpy(), want, atol=2e-3)
    assert (d.hue.abs() > 0.05).any()  # some rows had their hue turned
