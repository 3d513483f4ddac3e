"""fm_optuna."""
