"""Measuring samplers: the yardstick and verdict, evaluation over held-out noises, FID/KID through clean-fid,
features, reports and plots."""

from timetuner.exports import facade

__all__, __getattr__ = facade(__name__, {
    "DEFAULT_N": "timetuner.measuring.yardstick",
    "DEFAULT_REFERENCE_N": "timetuner.measuring.yardstick",
    "HeldOut": "timetuner.measuring.heldout",
    "Setup": "timetuner.measuring.evaluation",
    "build_yardstick": "timetuner.measuring.yardstick",
    "combine_sets": "timetuner.measuring.verdict",
    "digits_fd": "timetuner.measuring.metrics",
    "draw_nfe_curve": "timetuner.measuring.plots",
    "feature_statistics": "timetuner.measuring.metrics",
    "frechet_distance": "timetuner.measuring.metrics",
    "held_out_figures": "timetuner.measuring.evaluation",
    "judge": "timetuner.measuring.verdict",
    "markdown_table": "timetuner.measuring.report",
    "paired_bootstrap": "timetuner.measuring.metrics",
    "save_figure": "timetuner.measuring.plots",
    "set_seed": "timetuner.measuring.heldout",
    "t_interval": "timetuner.measuring.metrics",
})
