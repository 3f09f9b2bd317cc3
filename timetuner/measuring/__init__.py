"""Measuring samplers: the yardstick and verdict, evaluation over held-out noises, FID/KID through clean-fid,
features, reports and plots."""
