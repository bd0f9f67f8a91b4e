"""Flow-matching schedule: noise, velocity/x0 conversions, shift warping, ladders, re-noising, training loss."""

from dsa_jax.diffusion.flow import (add_noise, expand_per_frame, flow_matching_loss, renoise, sample_train_sigma,
                                   shift_sigma, velocity_from_x0, velocity_target, warp_ladder,
                                   x0_from_velocity)
