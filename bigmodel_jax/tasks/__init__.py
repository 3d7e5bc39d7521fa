"""Tasks by name: `config.task.name` -> loss and metrics for that kind of problem.

A task turns model outputs and a batch {'inputs','targets','mask'} into:
  train_loss(outputs, batch) -> (scalar loss, {metric: scalar})      inside the jitted train step
  eval_sums(outputs, batch)  -> {name: array of sums}                inside the jitted eval step
  finalize(sums)             -> {metric: value}                      on host, after all batches
  predict(outputs)           -> {name: per-example array}            for --mode=predict
  output_shape(input_shape)  -> the model output shape per example it expects (checked before training)
Padding rows have mask 0 and never count.
"""

from bigmodel_jax.registry import Registry

TASKS: Registry = Registry("task", "config.task.name")


def get_task(task_config, dataset):
  return TASKS.get(task_config.name)(task_config, dataset)


from bigmodel_jax.tasks import classification, language_modeling, regression  # noqa: E402,F401  (each registers itself)
