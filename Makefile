# Two commands do everything on a fresh machine with Python >= 3.10 and pip:
#   make train   # set up .venv and run the default job (vanilla OPD on the CPU testbed, logged to MLflow)
#   make test    # set up .venv and run the test suite
#   make demo    # set up .venv and a first result in under a minute (10 steps on the CPU testbed, MLflow experiment 'demo')
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default (small and fast). For a GPU: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
ARGS   ?=
# pytest-xdist processes for the suite (each test runs single-threaded): make test WORKERS=8 on a bigger machine
WORKERS ?= 2

.PHONY: install train demo test test-fast lint sweep zoo ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: install  ## the default job; extra Hydra overrides: make train ARGS="router=dopd seed=2"
	$(BIN)/python train.py $(ARGS)

demo: install  ## a first result in under a minute: the default job cut to 10 steps, logged to MLflow experiment 'demo'
	$(BIN)/python train.py trainer.max_steps=10 eval.every=5 data.n_eval=64 logger.experiment=demo $(ARGS)
	@echo "The 'final evaluation' line above is the student's greedy accuracy without p (eval/acc/test, ood, avg)."
	@echo "Open it in MLflow: make ui, then the run link printed above (or http://127.0.0.1:5000, experiment 'demo', 'Model training' toggle)."

test: install  ## the whole suite (what CI runs)
	$(BIN)/python -m pytest -q -n $(WORKERS)

test-fast: install  ## skip the slow end-to-end sweeps
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "not slow"

lint: install  ## ruff (rules in pyproject.toml); CI runs it after the tests
	$(BIN)/ruff check .

sweep: install  ## the canonical comparison: vanilla vs DOPD over three seeds, one MLflow parent run
	$(BIN)/python train.py -m router=vanilla,dopd seed=1,2,3 $(ARGS)

zoo: install  ## rebuild the shipped teacher/student pair under zoo/arith (SFT by the harness)
	$(BIN)/python scripts/build_zoo.py $(ARGS)

ui: install  ## the MLflow UI on the default store: http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db --default-artifact-root outputs/mlartifacts --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .pytest_cache
