#!/usr/bin/env bash
# Sourced by the experiment drivers after setup_env.sh: the trait, the model flag and the paths
# that extract_persona_lora.py writes for them. TRAIT and MODEL come from the environment.
trait="${TRAIT:-evil}"
model_flag=()
[ -n "${MODEL:-}" ] && model_flag=(--model "$MODEL")
model_name="$(basename "${MODEL:-SmolLM2-135M-Instruct}")"
persona="persona_loras/$model_name/$trait"
started=$(date +%s)
