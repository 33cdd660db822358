import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.eval import baseline, metrics


def test_psnr_matches_mse_definition():
  key1, key2 = jax.random.split(jax.random.key(0))
  a = jax.random.uniform(key1, (2, 16, 16, 3), minval=-1, maxval=1)
  b = jnp.clip(a + 0.1 * jax.random.normal(key2, a.shape), -1, 1)
  psnr, ssim = metrics.psnr_ssim(a, b)
  mse = jnp.mean(((a + 1) / 2 - (b + 1) / 2) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(psnr, -10 * jnp.log10(mse), rtol=1e-5)
  assert psnr.shape == ssim.shape == (2,)
  assert jnp.all(ssim < 1)
  np.testing.assert_allclose(metrics.psnr_ssim(a, a)[1], 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="shape mismatch"):
    metrics.psnr_ssim(a, b[:, :8])


def test_code_statistics_binary_and_multilevel():
  codes = np.array([[0, 1, 1], [1, 1, 0], [0, 1, 1], [1, 1, 0]])
  stats = metrics.code_statistics(codes, codebook_size=8)
  np.testing.assert_allclose(stats["per_dim_entropy"], [1.0, 0.0, 1.0])
  assert stats["unique_codes"] == 2
  assert stats["code_usage"] == 2 / 4
  stats = metrics.code_statistics(np.arange(9).reshape(9, 1), codebook_size=9)
  np.testing.assert_allclose(stats["per_dim_entropy"], [np.log2(9)])
  assert stats["code_usage"] == 1.0


def test_baseline_spends_the_budget_and_is_exact_on_flat_quantized_colours():
  levels = 2 ** 6
  colour = (np.array([3, 17, 60]) / (levels - 1)) * 2 - 1
  flat = jnp.broadcast_to(jnp.asarray(colour, jnp.float32), (1, 16, 16, 3))
  np.testing.assert_allclose(
      baseline.area_downsample_baseline(flat, patch=8, bits_per_token=18), flat, atol=1e-6)
  noisy = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1)
  with pytest.raises(ValueError, match="divisible by 8"):
    baseline.area_downsample_baseline(noisy[:, :12], patch=8, bits_per_token=18)
  with pytest.raises(ValueError, match="3 channels"):
    baseline.area_downsample_baseline(noisy, patch=8, bits_per_token=16)


def test_baseline_improves_with_budget():
  ramp = jnp.linspace(-1, 1, 32)
  image = jnp.stack([ramp[:, None] * ramp[None, :], ramp[:, None] + 0 * ramp, 0 * ramp[:, None] + ramp], -1)[None]
  psnr = [float(metrics.psnr_ssim(image, baseline.area_downsample_baseline(image, patch=p, bits_per_token=b))[0][0])
          for p, b in [(8, 3), (8, 18), (4, 18)]]
  assert psnr[0] < psnr[1] < psnr[2]
