"""Demo of ensemble distillation (SPEC 11): a student with a CNN14 half as wide as the demo's learns from the demo
model's embeddings (the teacher), on the same synthetic data.

  python -m atr_jax.main --config configs/demo.py --workdir runs/demo                      # the teacher
  python -m atr_jax.retrieve embed-train --workdir runs/demo --out runs/demo/teacher
  python -m atr_jax.main --config configs/demo_distill.py:runs/demo/teacher --workdir runs/demo_student
  python -m atr_jax.main --config configs/demo_distill.py --config.distill.teachers= --workdir runs/demo_alone

The argument after the colon is the teacher folder (default runs/demo/teacher); an empty
--config.distill.teachers= trains the same student without distillation.
"""

from configs import demo


def get_config(teachers: str = "runs/demo/teacher"):
  config = demo.get_config()
  config.model.audio.channels = (4, 8, 16, 32, 64, 128)  # Half the demo's widths: ~1/4 of its CNN14 parameters.
  config.distill.teachers = teachers
  config.distill.weight = 1.0
  return config
