"""Preprocessing: the one typed record of how records become features, written by prepare and read back by
eval / predict / serve (issue 22)."""

import dataclasses
import inspect
import json

import pytest

from mmllm import features, modalities
from mmllm.config import PrepareConfig, default
from mmllm.features import Preprocessing, checkpoint_preprocessing


def test_record_round_trips_and_older_records_take_prepares_defaults():
    cfg = PrepareConfig(input=["m.csv"], output="p", max_text_tokens=40, max_audio_seconds=7.5, seed=3, augment=2,
                        sequence_features=True, precision="fp32")
    pre = Preprocessing.of(cfg)
    recorded = pre.recorded()
    assert not set(Preprocessing.RUN_ONLY) & set(recorded)
    assert json.loads(json.dumps(recorded)) == recorded  # what the metadata holds is plain JSON
    back = Preprocessing.read(recorded, max_file_mb=9, batch_size=4, cache=False)
    assert dataclasses.replace(back, max_file_mb=pre.max_file_mb, batch_size=pre.batch_size, cache=pre.cache) == pre
    old = checkpoint_preprocessing({"preprocessing": {"max_text_tokens": 40, "batch_size": 1, "cache": True}}, 5)
    assert old.batch_size == default(PrepareConfig, "batch_size")  # run limits are not read from the data
    assert old.max_text_tokens == 40 and old.max_file_mb == 5 and not old.cache and old.text_trunk_layers == 0
    assert old.option("max_audio_seconds") == default(PrepareConfig, "max_audio_seconds")  # the plug-in's default
    assert old.precision == "fp32" and old.transcribe is None  # what data from before these were recorded used
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.max_file_mb = 1  # type: ignore[misc]


def test_features_never_build_a_stand_in_prepare_config():
    src = inspect.getsource(features)
    assert "PrepareConfig(" not in src  # the record is read back; no second copy of prepare's defaults


def test_prepared_metadata_and_checkpoint_hold_the_same_record(trained_checkpoint):
    meta = json.loads((trained_checkpoint.parent / "p" / features.META).read_text())
    config = json.loads((trained_checkpoint / "config.json").read_text())
    assert config["preprocessing"] == meta["preprocessing"]
    fixed = {k for m in modalities.all() for k in m.fixed}
    options = {o.name for _, o in modalities.options()}
    assert set(meta["preprocessing"]) == {f.name for f in dataclasses.fields(Preprocessing)} - {"options"} \
        - set(Preprocessing.RUN_ONLY) | set(Preprocessing.FIXED) | fixed | options
