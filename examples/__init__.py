"""Worked examples of fm_optuna on problems of your own (see README: "Your own problem")."""
