"""`python -m engine.eval`: the FIM evaluation (`make eval`)."""

from engine.eval.harness import main

raise SystemExit(main())
