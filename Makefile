# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(PY) training/run_demo.py --output_dir runs/demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_utilisation.py --profile "U-Net, cached"
	$(PY) benchmarks/bench_step_options.py --steps 10 --options baseline foreach fused channels_last
	$(PY) benchmarks/bench_step_options.py --steps 10 --options baseline compile --stages "U-Net, cached"
	$(PY) benchmarks/bench_under_load.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_streaming.py
	$(PY) benchmarks/scale_plan.py
	$(PY) benchmarks/bench_shapes.py
	$(PY) benchmarks/bench_unet_training.py --steps 40
	$(PY) benchmarks/bench_unet_training.py --size gpu --steps 5 --batch_size 8 --check
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_pipeline.py --scheduler dpm++ --steps 20 --guidance_scale 5 --guidance_interval 1.0 inf
	$(PY) benchmarks/bench_determinism.py

clean:
	rm -rf runs .pytest_cache
