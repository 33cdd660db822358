"""bitgen: generative image models in binary latent spaces (JAX / Flax NNX)."""

__version__ = "0.1.0"
