"""Running the router: its typed configuration (config.py), audit log (audit.py), start-up reconciliation
(reconcile.py), metrics (metrics.py), web console and review desk (console.py, review.py), backups
(backup.py) and router.py's --check / --status (service.py)."""
