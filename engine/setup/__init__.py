"""Install helpers, torch-free: the Makefile runs install_torch before the venv exists."""
