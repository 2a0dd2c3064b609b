"""Everything that touches Axolotl, one module per moment of a run.

``plugin.MotePlugin`` is the switchboard; each hook delegates here:

=============================  ==================================================
module                         hooks / job
=============================  ==================================================
``config``                     ``register``: raw-config defaults and checks
``model``                      ``pre_model_load``, ``pre_lora_load``,
                               ``get_lora_config_kwargs``, ``post_lora_load``
``trainer``                    ``get_trainer_cls``: routing around every step
``callbacks``                  ``add_callbacks_post_trainer``
``saving``                     ``post_train`` and checkpoints: self-describing adapters
=============================  ==================================================

The library underneath (``tuner/``, ``data/``, ``generation/``) never imports this
package.
"""
