"""`python -m engine.train`: the trainer (`make train`)."""

from engine.train.trainer import main

raise SystemExit(main())
