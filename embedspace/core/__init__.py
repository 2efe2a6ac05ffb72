"""The training core, owned by no method: state, step, loop, checkpoints, workdirs, configs.

`train.train_and_evaluate(task, config, workdir)` runs any method given as a `task.Task`;
`step.make_train_step(loss_fn)` is the one step (value_and_grad, the explicit pmean, the optax
update, EMA targets, the non-finite guard). Nothing here imports a method.
"""
