"""fastddim's Stable Diffusion pipelines on the CPU: bit-identical parity with diffusers' pipelines (eager and through
the CPU stand-in for capture), loaders, scheduler handling, eager-only arguments and the graph cache.

fp32 on the CPU runs the same operations in the same order as diffusers with its DDIMScheduler, so images must be
equal bit for bit (``np.testing.assert_array_equal``). The CUDA side is in ``test_sd_pipelines_gpu.py``.
"""

import logging

import diffusers
import numpy as np
import pytest
import torch

import fastddim

# The pipelines' text encoders and tokenizers come from transformers (not a fastddim dependency).
pytest.importorskip("transformers")
from tests.sd_components import ddim_scheduler  # noqa: E402
from tests.sd_parity import PROMPT, STEPS, call_both, generators, init_image, pair  # noqa: E402

TEXT2IMG_CASES = {
    "eta0": dict(eta=0.0),
    "eta1": dict(eta=1.0),
    "guidance1-no-cfg-batch": dict(guidance_scale=1.0, eta=1.0),
    "guidance7.5-negative-prompt": dict(guidance_scale=7.5, negative_prompt="blurry, low quality"),
    "two-prompts-two-per-prompt": dict(prompt=[PROMPT, "a dog"], num_images_per_prompt=2, eta=1.0, seeds=(1, 2, 3, 4)),
    "guidance-rescale": dict(guidance_rescale=0.7, eta=0.5),
    "given-latents": dict(latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)), eta=1.0),
}


@pytest.mark.parametrize("case", TEXT2IMG_CASES.values(), ids=TEXT2IMG_CASES.keys())
def test_text2img_matches_diffusers_bit_for_bit(sd, path, case):
    ours, theirs = pair(fastddim.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd)
    case = dict(case)
    prompt, seeds = case.pop("prompt", PROMPT), case.pop("seeds", 0)
    mine, reference = call_both(ours, theirs, path, seeds, prompt=prompt, num_inference_steps=STEPS, **case)
    assert mine.shape == reference.shape and mine.shape[1:] == (16, 16, 3)
    np.testing.assert_array_equal(mine, reference)


def test_zero_terminal_snr_trailing_v_prediction_matches_diffusers(sd, path):
    """The scheduler docs' recipe for zero-terminal-SNR models, with the guidance rescale it recommends."""
    ours, theirs = pair(
        fastddim.StableDiffusionPipeline,
        diffusers.StableDiffusionPipeline,
        sd,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )
    mine, reference = call_both(ours, theirs, path, prompt=PROMPT, num_inference_steps=STEPS, guidance_rescale=0.7)
    assert np.isfinite(mine).all()
    np.testing.assert_array_equal(mine, reference)


def test_guidance_embedding_unet_matches_diffusers(sd, path):
    """UNets with ``time_cond_proj_dim`` (guidance-distilled) take the guidance as an embedding, a per-call input of the
    captured loop: a new guidance value replays the same graph."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config({**sd["unet"].config, "time_cond_proj_dim": 8}).eval()
    ours, theirs = pair(fastddim.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, {**sd, "unet": unet})
    for guidance_scale in (7.5, 3.0):
        mine, reference = call_both(
            ours, theirs, path, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=guidance_scale
        )
        np.testing.assert_array_equal(mine, reference)
    if path == "graph":
        assert ours.cuda_graph_cache_info()[:2] == (1, 1)


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=lambda e: f"eta{e}")
def test_img2img_matches_diffusers_bit_for_bit(sd, path, strength, eta):
    ours, theirs = pair(fastddim.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline, sd)
    kwargs = dict(prompt=PROMPT, image=init_image(), strength=strength, eta=eta, num_inference_steps=10)
    mine, reference = call_both(ours, theirs, path, **kwargs)
    np.testing.assert_array_equal(mine, reference)


def test_img2img_channels_last_latents_match_diffusers(sd, path):
    """Latents handed in channels-last (as a VAE may return them) stay so through every step, as in diffusers, so
    each UNet call runs the same CPU kernels: bit-identical instead of ~1e-6 apart."""
    ours, theirs = pair(fastddim.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline, sd)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    latents = latents.to(memory_format=torch.channels_last)
    kwargs = dict(prompt=PROMPT, image=latents, strength=0.8, eta=1.0, num_inference_steps=10)
    mine, reference = call_both(ours, theirs, path, **kwargs)
    np.testing.assert_array_equal(mine, reference)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=lambda e: f"eta{e}")
@pytest.mark.parametrize("clipped", [False, True], ids=["plain", "clipped-model-output"])
def test_cpu_step_lays_outputs_out_as_diffusers(prediction_type, eta, clipped):
    """A channels-last sample with a contiguous model output (as a UNet may return it): x_t-1 and x_0 come back in
    the memory format diffusers' chain of ops gives them (the sample's, for epsilon and v-prediction)."""
    config = dict(prediction_type=prediction_type, clip_sample=True, clip_sample_range=2.0)
    ours, theirs = fastddim.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    sample = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    model_output = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    kwargs = dict(eta=eta, variance_noise=noise, use_clipped_model_output=clipped)
    mine = ours.step(model_output, ours.timesteps[3], sample, **kwargs)
    reference = theirs.step(model_output, theirs.timesteps[3], sample, **kwargs)
    for name in ("prev_sample", "pred_original_sample"):
        assert mine[name].stride() == reference[name].stride(), name
        torch.testing.assert_close(mine[name], reference[name], atol=0, rtol=0)
    if prediction_type != "sample":
        assert mine.prev_sample.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "kwargs",
    [dict(eta=0.0), dict(denoising_end=0.6, eta=1.0), dict(denoising_end=0.5, guidance_rescale=0.5)],
    ids=["eta0", "denoising-end-0.6-eta1", "denoising-end-0.5-rescale"],
)
def test_sdxl_matches_diffusers_bit_for_bit(sdxl, path, kwargs):
    ours, theirs = pair(fastddim.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, sdxl)
    mine, reference = call_both(ours, theirs, path, prompt=PROMPT, num_inference_steps=5, **kwargs)
    np.testing.assert_array_equal(mine, reference)


# ---------------------------------------------------------------------------------------------- loaders, schedulers


def test_subclasses_share_modules_from_pipe_and_from_pretrained(sd, tmp_path):
    theirs = diffusers.StableDiffusionPipeline(**sd)
    theirs.set_progress_bar_config(disable=True)
    ours = fastddim.StableDiffusionPipeline.from_pipe(theirs)
    ours.set_progress_bar_config(disable=True)
    assert isinstance(ours, diffusers.StableDiffusionPipeline)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(ours, name) is getattr(theirs, name), f"{name} was copied"
    assert type(theirs.scheduler) is diffusers.DDIMScheduler, "from_pipe changed the source pipeline"
    assert type(ours.scheduler) is fastddim.DDIMScheduler
    # The same config, plus fastddim's own keys (e.g. prev_timestep_from_schedule) at their defaults.
    own_keys = set(ours.scheduler.config) - set(theirs.scheduler.config)
    shared = {k: v for k, v in ours.scheduler.config.items() if k not in own_keys and k != "_use_default_values"}
    assert shared == {k: v for k, v in theirs.scheduler.config.items() if k != "_use_default_values"}
    assert own_keys == {"prev_timestep_from_schedule"} and not ours.scheduler.config.prev_timestep_from_schedule
    img2img = fastddim.StableDiffusionImg2ImgPipeline.from_pipe(ours)
    assert isinstance(img2img, diffusers.StableDiffusionImg2ImgPipeline) and img2img.unet is ours.unet

    theirs.save_pretrained(tmp_path)
    loaded = fastddim.StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is fastddim.StableDiffusionPipeline and type(loaded.scheduler) is fastddim.DDIMScheduler
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, output_type="np")
    expected = theirs(generator=generators(0), **kwargs).images
    # Loaded weights sit in differently aligned memory, so CPU kernels may round differently (seen: 7e-7).
    np.testing.assert_allclose(loaded(generator=generators(0), **kwargs).images, expected, atol=1e-5, rtol=0)


def test_assigned_schedulers(sd):
    pipe = fastddim.StableDiffusionPipeline(**sd)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is fastddim.DDIMScheduler, "diffusers' DDIMScheduler is converted on assignment"
    assert pipe.config.scheduler[1] == "DDIMScheduler"
    fast = fastddim.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = fast
    assert pipe.scheduler is fast

    class CustomDDIM(diffusers.DDIMScheduler):
        pass

    custom = CustomDDIM.from_config(pipe.scheduler.config)
    pipe.scheduler = custom
    assert pipe.scheduler is custom, "a subclass may change the step: kept, and run by diffusers' loop"


@pytest.mark.parametrize("scheduler_class", [diffusers.EulerDiscreteScheduler, diffusers.PNDMScheduler], ids=str)
def test_other_schedulers_run_the_parent_loop_unchanged(sd, stand_in_graphs, scheduler_class):
    scheduler = scheduler_class.from_config(ddim_scheduler().config)
    ours = fastddim.StableDiffusionPipeline(**{**sd, "scheduler": scheduler})
    theirs = diffusers.StableDiffusionPipeline(**{**sd, "scheduler": scheduler_class.from_config(scheduler.config)})
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    assert ours.scheduler is scheduler
    mine = ours(PROMPT, num_inference_steps=STEPS, generator=generators(0), output_type="np").images
    reference = theirs(PROMPT, num_inference_steps=STEPS, generator=generators(0), output_type="np").images
    np.testing.assert_array_equal(mine, reference)
    assert stand_in_graphs == [] and ours.cuda_graph_cache_info().misses == 0
    with pytest.raises(ValueError, match="DDIM scheduler"):
        ours(PROMPT, num_inference_steps=STEPS, cuda_graph=True)


# ---------------------------------------------------------------------------------------------- graph path


def test_new_prompt_guidance_and_seed_replay_the_same_graph(sd, stand_in_graphs):
    ours, theirs = pair(fastddim.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd)
    calls = [
        dict(prompt=PROMPT, seeds=0),
        dict(prompt="a red car", seeds=0),
        dict(prompt=PROMPT, seeds=5),
        dict(prompt=PROMPT, seeds=0, guidance_scale=3.0),
        dict(prompt=PROMPT, seeds=0, negative_prompt="blurry"),
    ]
    results = []
    for call in calls:
        call = dict(call)
        seeds = call.pop("seeds")
        mine, reference = call_both(ours, theirs, "graph", seeds, num_inference_steps=STEPS, eta=1.0, **call)
        np.testing.assert_array_equal(mine, reference, err_msg=str(call))
        results.append(mine)
    assert len(stand_in_graphs) == 1
    assert ours.cuda_graph_cache_info()[:4] == (len(calls) - 1, 1, fastddim.graphs.DEFAULT_CUDA_GRAPH_CACHE_SIZE, 1)
    for i in range(1, len(calls)):
        assert np.abs(results[i] - results[0]).max() > 1e-4, f"call {i} replayed stale inputs"

    # Guidance 1.0 drops the CFG batch: another graph.
    ours(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, cuda_graph=True, output_type="np")
    assert ours.cuda_graph_cache_info().misses == 2


def test_sdxl_added_conditioning_is_a_per_call_input(sdxl, stand_in_graphs):
    ours, theirs = pair(fastddim.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, sdxl)
    for call in (dict(prompt=PROMPT), dict(prompt="a dog", original_size=(32, 32)), dict(prompt=PROMPT)):
        mine, reference = call_both(ours, theirs, "graph", num_inference_steps=5, denoising_end=0.6, **call)
        np.testing.assert_array_equal(mine, reference, err_msg=str(call))
    assert ours.cuda_graph_cache_info()[:2] == (2, 1)


def test_eager_only_arguments_give_the_captured_results(sd, stand_in_graphs, caplog):
    ours, _ = pair(fastddim.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd)
    kwargs = dict(prompt=PROMPT, num_inference_steps=STEPS, eta=1.0, output_type="np")
    captured = ours(generator=generators(0), **kwargs).images
    assert ours.cuda_graph_cache_info().misses == 1
    steps = []

    def on_step_end(pipe, i, t, callback_kwargs):
        steps.append(int(t))
        return callback_kwargs

    with caplog.at_level(logging.INFO, logger="fastddim.pipelines.loop"):
        with_callback = ours(generator=generators(0), callback_on_step_end=on_step_end, **kwargs).images
    assert [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()] != []
    assert steps == ours.scheduler.timesteps.tolist()
    np.testing.assert_array_equal(with_callback, captured)
    legacy = []
    with pytest.warns(FutureWarning):
        old_style = ours(generator=generators(0), callback=lambda *a: legacy.append(a[0]), callback_steps=1, **kwargs)
    np.testing.assert_array_equal(old_style.images, captured)
    assert legacy == list(range(STEPS))
    assert ours.cuda_graph_cache_info()[:2] == (0, 1), "eager-only calls must not touch the graph cache"


def test_eager_flag_and_invalid_cuda_graph_arguments(sd):
    ours, theirs = pair(fastddim.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd)
    eager = ours(PROMPT, num_inference_steps=STEPS, generator=generators(0), cuda_graph=False, output_type="np")
    default = ours(PROMPT, num_inference_steps=STEPS, generator=generators(0), output_type="np")
    np.testing.assert_array_equal(eager.images, default.images)
    with pytest.raises(ValueError, match="cuda_graph"):
        ours(PROMPT, num_inference_steps=STEPS, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph"):
        ours(PROMPT, num_inference_steps=STEPS, cuda_graph="yes")
    # diffusers' own argument checks still run.
    with pytest.raises(ValueError, match="divisible by 8"):
        ours(PROMPT, height=12, width=16, num_inference_steps=STEPS)


def test_outputs_match_diffusers_types(sd):
    ours, theirs = pair(fastddim.StableDiffusionPipeline, diffusers.StableDiffusionPipeline, sd)
    for output_type in ("pil", "pt", "latent"):
        mine = ours(PROMPT, num_inference_steps=2, generator=generators(0), output_type=output_type)
        reference = theirs(PROMPT, num_inference_steps=2, generator=generators(0), output_type=output_type)
        assert type(mine) is type(reference) and type(mine.images) is type(reference.images)
        assert mine.nsfw_content_detected == reference.nsfw_content_detected
    as_tuple = ours(PROMPT, num_inference_steps=2, generator=generators(0), output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
