"""The mixed-precision search: environment (env), budget (constraint), observation (features), agents (ddpg),
episode evaluation and rewards (evaluate), and the stage that runs it (run)."""
