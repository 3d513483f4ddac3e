from fm_optuna.cli import main

raise SystemExit(main())
