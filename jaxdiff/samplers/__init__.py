"""Samplers: every step a pure function, every loop one `lax.scan`.

    x0 = jd.samplers.sample(model_fn, schedule, noise, key=key, method="dpmpp_2m", steps=20)

Methods: ddpm, ddim, euler, euler_ancestral, heun, dpmpp_2m, unipc, lcm, flow_euler,
flow_heun, langevin_pc; `ddim_invert` runs DDIM inversion (x_0 -> x_T); `mask_blend` is the inpainting hook.
"""
from jaxdiff.samplers.base import Method
from jaxdiff.samplers.driver import METHODS, ddim_invert, get_method, make_grid, mask_blend, sample
from jaxdiff.samplers.grids import SPACINGS, Grid

__all__ = ["METHODS", "SPACINGS", "Grid", "Method", "ddim_invert", "get_method", "make_grid", "mask_blend", "sample"]
