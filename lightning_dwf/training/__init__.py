"""Training mechanics, no Lightning: the penalty inside any optimizer, the factor LR, the regimes (how λ and the support
evolve), the controller, the support cut, rollbacks, the fake quantizer, and ``TrainingRun`` that drives them."""
