"""The LM head's logits are fp32, and its backward matmuls run in the compute dtype.

With bf16 compute the two backward dots take bf16 operands (no fp32/TF32 matmul
over the vocabulary) and the gradients stay within bf16 rounding of fp32
autodiff; with fp32 compute the custom VJP equals plain autodiff.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from mtllama_jax.models.llama.model import lm_head_logits


def _inputs(dtype):
    kx, kw, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 8, 32), jnp.float32)
    w = jax.random.normal(kw, (32, 96), jnp.float32) * 0.2
    targets = jax.random.randint(kt, (2, 8), 0, 96)
    return x.astype(dtype), w.astype(dtype), targets


def _loss(head):
    def loss(x, w, targets):
        logits = head(x, w)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    return loss


def _autodiff(x, w):
    return jnp.einsum("...e,ev->...v", x, w, preferred_element_type=jnp.float32)


def _dot_generals(jaxpr):
    """Every dot_general equation of a jaxpr, sub-jaxprs (custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                yield from _dot_generals(inner)


def test_fp32_logits_and_bf16_backward_matmuls():
    x, w, targets = _inputs(jnp.bfloat16)
    assert lm_head_logits(x, w).dtype == jnp.float32
    jaxpr = jax.make_jaxpr(jax.grad(_loss(lm_head_logits), argnums=(0, 1)))(x, w, targets)
    dots = list(_dot_generals(jaxpr.jaxpr))
    assert len(dots) == 3  # forward + two backward
    for eqn in dots:
        assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn


def test_gradients_match_autodiff():
    x, w, targets = _inputs(jnp.float32)
    want = jax.grad(_loss(_autodiff), argnums=(0, 1))(x, w, targets)
    got = jax.grad(_loss(lm_head_logits), argnums=(0, 1))(x, w, targets)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7)
    x16, w16, _ = _inputs(jnp.bfloat16)
    got16 = jax.grad(_loss(lm_head_logits), argnums=(0, 1))(x16, w16, targets)
    for g, r in zip(got16, want):
        g = np.asarray(g, np.float32)
        assert np.linalg.norm(g - r) <= 2e-2 * np.linalg.norm(r)
