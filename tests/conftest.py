"""Lets tests import their shared helpers (train_helpers) and the repository's configs, and gives
the session one JAX compilation cache."""

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CACHE_SETTINGS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')


def pytest_configure(config):
  """One persistent compilation cache for this process and every command it starts.

  The tests' tiny runs compile the same programs again and again, and compiling is most of a
  tiny run's time: tests/train_test.py ran 1.4x as fast with it. Set in the environment before
  the test modules import JAX (and before they copy the environment for their commands). A
  cache the caller set is kept.
  """
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  directory = tempfile.mkdtemp(prefix='dlrm_jax_tests_jax_cache_')
  config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
  os.environ['JAX_COMPILATION_CACHE_DIR'] = directory
  # Small programs too (JAX caches only those compiling for over a second by default): the
  # eager ops of initialisation are dozens of them.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  if 'jax' in sys.modules:  # imported already (by a plugin): it read the environment then
    set_compilation_cache(directory, 0.0)


@pytest.fixture
def no_compilation_cache():
  """This process compiles without a persistent cache, for one test."""
  import jax  # pylint: disable=g-import-not-at-top
  before = [getattr(jax.config, name) for name in CACHE_SETTINGS]
  set_compilation_cache(None, before[1])
  yield
  set_compilation_cache(*before)


def set_compilation_cache(directory, min_compile_time_secs):
  """This process's persistent compilation cache (None: none), in use from its next compile."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update(CACHE_SETTINGS[0], directory)
  jax.config.update(CACHE_SETTINGS[1], min_compile_time_secs)
  # JAX decides once per process whether the cache is in use.
  compilation_cache.reset_cache()
