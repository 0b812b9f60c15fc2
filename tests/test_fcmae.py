"""FCMAE pretraining: masking, loss on masked patches only, masked dense convolution, training, finetune."""
import json

import pytest
import torch

import main as cli
from conftest import assert_same_epochs, stopped_at, train_argv
from models import load_pretrained
from models.fcmae import FCMAE, random_patch_mask, upsample_mask


def tiny(**kw):
    return FCMAE('convnextv2_atto', decoder_embed_dim=32, **kw).eval()


@pytest.mark.parametrize('ratio', [0.0, 0.25, 0.6, 0.75])
def test_masked_fraction_matches_ratio(ratio):
    mask = random_patch_mask(8, 4, ratio)
    assert mask.shape == (8, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == round(16 * ratio)).all()
    assert not torch.equal(mask[0], mask[1]) or ratio == 0.0
    with pytest.raises(ValueError, match='mask_ratio'):
        random_patch_mask(1, 4, 1.0)


def test_patch_mask_compiles_at_a_dynamic_batch_size():
    # torch.compile's default re-traces with a symbolic batch size when the batch changes (as the compile warm-up
    # on a batch of 2 once made every FCMAE run do); torch.rand(..., generator=None) could not be traced there
    compiled = torch.compile(lambda x: random_patch_mask(x.shape[0], 3, 0.5), dynamic=True)
    for batch in (2, 5):
        mask = compiled(torch.zeros(batch, 1))
        assert mask.shape == (batch, 9) and (mask.sum(1) == round(9 * 0.5)).all()
    seeded = random_patch_mask(2, 3, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seeded, random_patch_mask(2, 3, 0.5, generator=torch.Generator().manual_seed(0)))


def test_model_masks_its_ratio():
    model = tiny(mask_ratio=0.75)
    _, pred, mask = model(torch.randn(2, 3, 64, 64))
    assert pred.shape == (2, 4, 32 * 32 * 3) and (mask.sum(1) == 3).all()


def test_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    model = tiny(norm_pix_loss=False)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1., 0., 0., 1.], [0., 1., 0., 0.]])
    loss, pred, _ = model(images, mask)
    target = model.patchify(images)
    per_patch = ((pred - target) ** 2).mean(-1)
    assert loss.item() == pytest.approx((per_patch * mask).sum().item() / 3, rel=1e-5)
    # a perfect prediction on the visible patches changes nothing; on a masked patch it lowers the loss
    fixed = pred.clone()
    fixed[0, 1] = target[0, 1]
    assert model.loss(images, fixed, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    fixed[0, 0] = target[0, 0]
    assert model.loss(images, fixed, mask).item() < loss.item()


def test_masked_pixels_do_not_reach_visible_features():
    torch.manual_seed(0)
    model = tiny()
    images = torch.randn(1, 3, 128, 128)  # 4 x 4 patches
    mask = torch.zeros(1, 16)
    mask[0, [0, 5, 6, 15]] = 1
    changed = images.clone()
    pixel_mask = upsample_mask(mask, (128, 128)).bool().expand_as(images)
    changed[pixel_mask] = torch.randn(int(pixel_mask.sum())) * 10
    with torch.no_grad():
        a, b = model.encoder(images, mask), model.encoder(changed, mask)
        unmasked = model.encoder.encoder.forward_features(images)
        unmasked_changed = model.encoder.encoder.forward_features(changed)
    visible = ~upsample_mask(mask, a.shape[-2:]).bool().expand_as(a)
    assert torch.allclose(a[visible], b[visible], atol=1e-5)
    assert (a[~visible] == 0).all()
    # without the mask the same change does reach the visible positions (the test can fail)
    assert not torch.allclose(unmasked[visible], unmasked_changed[visible], atol=1e-3)


def test_pretraining_loss_falls_and_encoder_finetunes(elpv_small, tmp_path):
    out = tmp_path / 'fcmae'
    argv = ['--pretrain', 'True', '--data_path', elpv_small, '--output_dir', out, '--model', 'convnextv2_atto',
            '--input_size', '64', '--batch_size', '4', '--epochs', '6', '--num_workers', '0', '--lr', '2e-3',
            '--norm_pix_loss', 'False', '--normalize', 'imagenet',
            '--warmup_epochs', '1', '--decoder_embed_dim', '64', '--drop_path', '0', '--test_val_ratio', '0.25',
            '0.25', '--seed', '0']
    cli.main([str(a) for a in argv])
    records = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]
    losses = [r['pretrain_loss'] for r in records]
    assert len(losses) == 6 and min(losses[-2:]) < 0.8 * losses[0], losses
    assert records[0]['images'] == 20  # the 20 training images only (test and val unseen)
    classifier = cli.build_model(cli.get_args_parser().parse_args(['--model', 'convnextv2_atto', '--nb_classes',
                                                                   '4']))
    report = load_pretrained(classifier, out / 'encoder.pth')
    assert sorted(report['missing']) == ['head.fc.bias', 'head.fc.weight'] and report['unexpected'] == []
    encoder = torch.load(out / 'encoder.pth', weights_only=True)['model']
    assert torch.equal(classifier.stages[2].blocks[0].mlp.grn.weight, encoder['stages.2.blocks.0.mlp.grn.weight'])
    # a classifier trains from it through --finetune
    summary = cli.main([str(a) for a in train_argv(elpv_small, tmp_path / 'ft', '--model', 'convnextv2_atto',
                                                   '--finetune', out / 'encoder.pth', '--epochs', '1')])
    assert summary['epochs_run'] == 1


def fcmae_argv(data, out, *extra):
    """main.py flags for a tiny FCMAE pretraining."""
    return [str(a) for a in ['--pretrain', 'True', '--data_path', data, '--output_dir', out, '--model',
                             'convnextv2_atto', '--input_size', '64', '--batch_size', '4', '--epochs', '3',
                             '--num_workers', '0', '--decoder_embed_dim', '32', '--drop_path', '0',
                             '--warmup_epochs', '0', '--test_val_ratio', '0.25', '0.25', *extra]]


# with a loader worker, augmentation draws from the worker's RNG; two epochs suffice to see the resumed one
@pytest.mark.parametrize('workers,epochs', [('0', '3'), ('1', '2')])
def test_pretraining_resume_matches_uninterrupted(elpv_small, tmp_path, monkeypatch, workers, epochs):
    import pretrain

    def argv(out, *extra):
        return fcmae_argv(elpv_small, out, '--epochs', epochs, '--num_workers', workers, *extra)

    cli.main(argv(tmp_path / 'full'))
    monkeypatch.setattr(pretrain, 'pretrain_one_epoch', stopped_at(pretrain.pretrain_one_epoch, 1, 4))  # epoch 2
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv(tmp_path / 'cut'))
    monkeypatch.undo()
    # a line logged after the last checkpoint (a kill between the two writes) is dropped on resume
    with open(tmp_path / 'cut' / 'log.txt', 'a') as f:
        f.write(json.dumps({'epoch': 1, 'pretrain_loss': -1.0}) + '\n')
    cli.main(argv(tmp_path / 'cut', '--auto_resume', 'True'))
    full = [json.loads(x) for x in (tmp_path / 'full' / 'log.txt').read_text().splitlines()]
    cut = [json.loads(x) for x in (tmp_path / 'cut' / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in cut] == list(range(int(epochs)))
    assert_same_epochs(cut, full, ['pretrain_loss'])


def test_checkpoint_kinds_are_not_mixed(elpv_small, tmp_path):
    from utils import DataError
    cli.main(fcmae_argv(elpv_small, tmp_path / 'fcmae', '--epochs', '1'))
    cli.main([str(a) for a in train_argv(elpv_small, tmp_path / 'cls', '--model', 'convnextv2_atto', '--epochs', '1',
                                         '--test', 'False')])
    with pytest.raises(DataError, match='fcmae checkpoint cannot continue a classifier run'):
        cli.main([str(a) for a in train_argv(elpv_small, tmp_path / 'a', '--model', 'convnextv2_atto', '--resume',
                                             tmp_path / 'fcmae' / 'checkpoint-last.pth')])
    with pytest.raises(DataError, match='classifier checkpoint cannot continue a fcmae run'):
        cli.main(fcmae_argv(elpv_small, tmp_path / 'b', '--resume', tmp_path / 'cls' / 'checkpoint-last.pth'))


def test_pretraining_time_budget_fixes_the_length_and_resume_goes_on_from_it(elpv_small, tmp_path, monkeypatch):
    """--time_budget on FCMAE pretraining: the length decided after the first epoch (stubbed to 2 of at most 5:
    wall time is not reproducible) ends the run and its cosine there; a resumed run keeps it, and lengthens it (to 3)
    when more epochs fit."""
    import budget
    import pretrain

    def argv(out, *extra):
        return fcmae_argv(elpv_small, out, '--epochs', '5', '--warmup_epochs', '1', '--time_budget', '5', *extra)

    monkeypatch.setattr(budget, 'epochs_within_budget', lambda *a, **k: 2)
    summary = cli.main(argv(tmp_path / 'full'))
    full = [json.loads(x) for x in (tmp_path / 'full' / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in full] == [0, 1] and summary['epochs_run'] == 2
    assert full[-1]['lr'] == pytest.approx(1e-6)  # the cosine ends with the shortened run
    monkeypatch.setattr(pretrain, 'pretrain_one_epoch', stopped_at(pretrain.pretrain_one_epoch, 1, 4))  # epoch 2
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv(tmp_path / 'cut'))
    monkeypatch.undo()
    monkeypatch.setattr(budget, 'epochs_within_budget', lambda *a, **k: 3)  # after epoch 2, one more fits
    summary = cli.main(argv(tmp_path / 'cut', '--auto_resume', 'True'))
    cut = [json.loads(x) for x in (tmp_path / 'cut' / 'log.txt').read_text().splitlines()]
    assert_same_epochs(cut[:2], full, ['pretrain_loss', 'lr'])  # epoch 2 on the stored length
    assert summary['epochs_run'] == 3 and cut[-1]['lr'] == pytest.approx(1e-6)  # lengthened past the stored 2
