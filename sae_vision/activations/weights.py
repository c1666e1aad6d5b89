"""Where the network weights come from: model.weights_path, model.weights_dir or
$SAE_VISION_WEIGHTS_DIR, the per-user cache, or (with model.allow_download) a download that is
checked file by file against the pinned sha256 table below; and the weights file's own hash,
which every cache records so later stages can refuse activations from other weights.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from sae_vision.core import ModelConfig, atomic_write

WEIGHTS_ENV = "SAE_VISION_WEIGHTS_DIR"
WEIGHT_FILES = {"googlenet_bvlc": "bvlc_googlenet.npz", "inceptionv1": "inception5h.pth"}
# BVLC model-zoo GoogLeNet as per-layer raw float32 files (MIT-licensed caffejs, pinned commit).
CAFFEJS_URL = (
    "https://raw.githubusercontent.com/chaosmail/caffejs/"
    "424d98682b50dd88d0b8cca401c66855709bd013/models/bvlc_googlenet/weights"
)


def user_cache_dir() -> Path:
    """Per-user weights cache: $XDG_CACHE_HOME/sae_vision/weights (default ~/.cache/...)."""
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sae_vision" / "weights"
    )


def _hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"  # where Lucent's own download lands


def find_weights(cfg: ModelConfig) -> Path:
    """Weights file: model.weights_path, model.weights_dir / $SAE_VISION_WEIGHTS_DIR, user cache, download."""
    fname = WEIGHT_FILES[cfg.family]
    if cfg.weights_path:
        path = Path(cfg.weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights_path={cfg.weights_path} does not exist")
        return path
    dirs = [Path(d).expanduser() for d in (cfg.weights_dir, os.environ.get(WEIGHTS_ENV)) if d]
    dirs += [user_cache_dir()] + ([_hub_dir()] if cfg.family == "inceptionv1" else [])
    for d in dirs:
        if (d / fname).is_file():
            return d / fname
    hint = (
        f"No {fname} for model.family={cfg.family}; looked in: {', '.join(map(str, dirs))}. "
        f"Put {fname} into {user_cache_dir()}, or into any folder and set {WEIGHTS_ENV}=that "
        "folder (or model.weights_dir=..., or model.weights_path=/path/to/file)"
    )
    if not cfg.allow_download:
        raise FileNotFoundError(hint + ", or set model.allow_download=true with network access.")
    try:
        if cfg.family == "googlenet_bvlc":
            return _download_googlenet(user_cache_dir() / fname)
        return _download_inception5h(_hub_dir() / fname)
    except OSError as e:  # no network, HTTP error, full disk
        raise FileNotFoundError(f"{hint}. Download failed: {e}") from e


def _download_googlenet(dst: Path) -> Path:
    """Fetch the 116 caffejs files, check each sha256, pack them as an OIHW float32 npz."""
    arrays = {}
    from .googlenet import caffe_key, make_googlenet

    for param, t in make_googlenet().state_dict().items():
        key = caffe_key(param)
        layer, kind = key.rsplit(".", 1)
        rel = f"{layer}_{'filter' if kind == 'weight' else 'bias'}.bin"
        with urllib.request.urlopen(f"{CAFFEJS_URL}/{rel}", timeout=60) as r:
            blob = r.read()
        if hashlib.sha256(blob).hexdigest() != _CAFFEJS_SHA256[rel]:
            raise ValueError(f"sha256 mismatch for {CAFFEJS_URL}/{rel}; refusing to use it")
        a = np.frombuffer(blob, "<f4")
        if t.ndim == 4:  # caffejs stores filters as (out, kh, kw, in)
            o, i, kh, kw = t.shape
            a = a.reshape(o, kh, kw, i).transpose(0, 3, 1, 2)
        arrays[key] = np.ascontiguousarray(a.reshape(t.shape), dtype=np.float32)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst) as tmp, open(tmp, "wb") as f:  # readers never see half a file
        np.savez(f, **arrays)
    return dst


def _download_inception5h(dst: Path) -> Path:
    from lucent.modelzoo.inceptionv1 import model_urls

    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(model_urls["inceptionv1"], str(dst))
    return dst


@lru_cache(maxsize=32)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, mtime, size) so reloading does not rehash 28 MB."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


# sha256 of each caffejs weight file at the pinned commit (public checksums of public files).
_CAFFEJS_SHA256 = {
    "conv1/7x7_s2_bias.bin": "f418a01f9cd24edf3b35505df7006e66f389e3a486c7243c93b954c2b9c914e1",
    "conv1/7x7_s2_filter.bin": "1b01a6a24e8e75ce1d8556806a0fa63f84054eefb77fb4a2a2eac74bdbafc72a",
    "conv2/3x3_bias.bin": "93037ad54c15034532aa76c6170425018f219615c1c661ea63fd56d74a773657",
    "conv2/3x3_filter.bin": "beeba54f80463124db69073da09e10fce81b0fc6ab27ed80060e3494922b6dde",
    "conv2/3x3_reduce_bias.bin": "04ebdd5addd10357686f690e56ca9d5c4f481b4d205e3cd4a193ada03e73a9ac",
    "conv2/3x3_reduce_filter.bin": "affaf3c76909be2bc2f9148b538aa01623db182437516e4c8ec807372c5a46d1",
    "inception_3a/1x1_bias.bin": "7db8bece00cb1804bae457c1afcd72937e9a7b0e55ceef57fbb1a14b0be5633e",
    "inception_3a/1x1_filter.bin": "483115f38228fa564acf3a6aea6fa164450c87b0219d73d8f017bdbc16233ad7",
    "inception_3a/3x3_bias.bin": "a5e3f28e31f9d2f5c9916226e4d79d299b1c4a87c0ba00f6e7b2faaf8b4beae6",
    "inception_3a/3x3_filter.bin": "9618ba7d95f597123609e6ddfabeafd9034d2d5deba3136cfbb1a9e857ba5aba",
    "inception_3a/3x3_reduce_bias.bin": "9272cede7086675d5e02b3a45d21f917f463b840ecd2ece515b4f72dc5e3ee8e",
    "inception_3a/3x3_reduce_filter.bin": "7068cf89bd3de83bc7818b8b243de3073b41e49c5b98eab1bd5a55eb17301d2e",
    "inception_3a/5x5_bias.bin": "c26bb68e56a9f11543b4ce29e8263cb60f1331574a4065dd59e65d44c4ff2efc",
    "inception_3a/5x5_filter.bin": "382ed5a6529b7ecb1e0d98e8e575beae5232656f1ff80ee156e8c919ef6cb131",
    "inception_3a/5x5_reduce_bias.bin": "0e7bcf6c29f580fe27ad4460408f9707585b246f7ed08ecf5b3b8e3b8bb9f8a0",
    "inception_3a/5x5_reduce_filter.bin": "bf05be0078bff4d405e4449afc66925c45c4f64305b4439ebc0a55845171a1da",
    "inception_3a/pool_proj_bias.bin": "c4ee91cd35ae634d5a5355b8a2f866df0e4e4686ba06a9da81d534c0ba965ca0",
    "inception_3a/pool_proj_filter.bin": "9a65a9109c14e02b3febcd832edb92e58e23a48b628b66087233c33c0df6e12b",
    "inception_3b/1x1_bias.bin": "74d55ff32c7f0f9546cba9d31a736f5e719ebc5e27843561ab74032178a036bb",
    "inception_3b/1x1_filter.bin": "edcdb3a9c6441b05be0e0797c37dde0754a39a969346e8f18a580071494535dc",
    "inception_3b/3x3_bias.bin": "9116949c9aec549d66ac66504f2a691555cce4526b8bd5bba75dc7a06413462d",
    "inception_3b/3x3_filter.bin": "649b12908a1c36cd57b5402623c8bdbb633975054eca715a502c3209043c501e",
    "inception_3b/3x3_reduce_bias.bin": "90af9aae45d6426999b9d54829b12e5e4eb9405e7d1c9e8ed0321819c1b15491",
    "inception_3b/3x3_reduce_filter.bin": "9fe53e37f7029912f31d4056acac8aa13f145426bdc6f3dc187c9545691e2e78",
    "inception_3b/5x5_bias.bin": "94a55bccb7a6829aaf3fbcb740add56ad1e1acf10811462beeb105077945777b",
    "inception_3b/5x5_filter.bin": "8afa4e34f72a6acc74e2db5a9b6004eab7dc1c9ebd559bdcd2e9aed591320435",
    "inception_3b/5x5_reduce_bias.bin": "380dcb33a498c0e0f482f9c5169c6abe19ad3b8931ff00d741fc58133fc6b1ed",
    "inception_3b/5x5_reduce_filter.bin": "c0e549b260f950f62c2880f6d867842e3b9cf00918bf0ba12fa90fd0b7440405",
    "inception_3b/pool_proj_bias.bin": "660345e8e28cb12a87122bc3cc7246472e6595243aa55dd44a28745b8b2bd6cd",
    "inception_3b/pool_proj_filter.bin": "e6e27fd68398eab0890dc3f4fed7d32b2f345722803c11608560384679d7743d",
    "inception_4a/1x1_bias.bin": "2008e17c1e87b6cf16443c2f18b115e34c95ccbd7a6c4bf1c334f3f93a3e9d75",
    "inception_4a/1x1_filter.bin": "8684a3661e6abd063fea590cf53743d03ba91a0dc3ffe0cc548ecae1dc9f385b",
    "inception_4a/3x3_bias.bin": "96fc7bd25cb6581d7f1ad1a852f794c6b8c8283310abc7cf75049438bf13693b",
    "inception_4a/3x3_filter.bin": "9af339a9df22b402bc6a21f6bc91963c3a09a4fed17572edb27e74ebb549ca29",
    "inception_4a/3x3_reduce_bias.bin": "116b2a2b6f97a5af93beff40ee2e186cfa034bd78fadc4831b992639665fda91",
    "inception_4a/3x3_reduce_filter.bin": "6a6b266f138298ad214ffc3db9ec8a40b10e4bf8747ba3b027b98a9a8c98a849",
    "inception_4a/5x5_bias.bin": "ed283b560c94dd37032a5805b47c5fb1a8a1449d026da9736fc5b0aa3bd0cce1",
    "inception_4a/5x5_filter.bin": "f055f9b596b38c8bb188bfd8402e1ab09d3f22aae72dd0083cb38254daae19fe",
    "inception_4a/5x5_reduce_bias.bin": "297c9e1526840dea22e044f7377b20edbb905c111c2e7b416a4d69f0ac323837",
    "inception_4a/5x5_reduce_filter.bin": "e6234ba3e43371324658610ca1acbeaafd70f83c9134ae22fb2e11ba6d9e5a75",
    "inception_4a/pool_proj_bias.bin": "feb120d4589c93559eec719a5256a7fe339c48fa1628e833762916ef88cdf556",
    "inception_4a/pool_proj_filter.bin": "9c9eae682e99e288a18cd982022717095852eac63ac9250b583436171e4af1a5",
    "inception_4b/1x1_bias.bin": "86d7ad88cd8bd644a5a09dc1e984ddf75833ca8f93ce9a4a8cc8f22edf0dd496",
    "inception_4b/1x1_filter.bin": "175065f9600d8d44e8e47c50f1f7dc140ab3d817cc0513d7f44667401a7e0305",
    "inception_4b/3x3_bias.bin": "155007cef1de74c078902606515715d71455bbf1dc5cb112f33878a10f695574",
    "inception_4b/3x3_filter.bin": "d19452abbac79b9134964e731d1879f9d2c45734010d5f131b79374baa95c456",
    "inception_4b/3x3_reduce_bias.bin": "59748a7e046625a0c01bc88841efcfc5ac54eaca8be1c3e39e3e095143b25baa",
    "inception_4b/3x3_reduce_filter.bin": "148effa34178f0a8dd2acb8a7882af1f31ff336192ca2e82630a79db22e9c4c7",
    "inception_4b/5x5_bias.bin": "e9dd2e83bde9cb324684d1b86adbecb7bcca70ab45457b1ec38386968cd9447a",
    "inception_4b/5x5_filter.bin": "b36e15dc13792e7f51e7aabf30fb17c2981a95c9cf532285627264d3a290416b",
    "inception_4b/5x5_reduce_bias.bin": "aa14b51d4eb3e985461fc20dec04430c0c13c305d63f23d154e8564019f76bd7",
    "inception_4b/5x5_reduce_filter.bin": "8f2eddd020c81d2042c9643205fd54bd60205ad642db82015db871a6b0d2b8d1",
    "inception_4b/pool_proj_bias.bin": "74e3ef2aec5c883ab986d6d74d99a0b01a07bde705c9a551aef038afa25569bb",
    "inception_4b/pool_proj_filter.bin": "3f43092fa54c6f8ae1853f14bb83187ed668c3ad39117bcc6dc2aa0a7ecc4a78",
    "inception_4c/1x1_bias.bin": "05d1dca21b90647c561916b2cf2f31c165bd8253db60740fe318e1f352026906",
    "inception_4c/1x1_filter.bin": "99916cbee54341c05486c587cd65f2665ab45f0175f326d0f6274c839f404131",
    "inception_4c/3x3_bias.bin": "4a49f26b769cb7489882e6a7b4ab3d02bc6634398654f42184cedee43dad7e68",
    "inception_4c/3x3_filter.bin": "74fa00e36878021f4c2508bd2984ae0f64e9bc28bef4db8b935612466a20b25f",
    "inception_4c/3x3_reduce_bias.bin": "265a1dbe217ce4428e27a3b5ecc032e01a39d0aa3cafbd9b693f7de2fa0f1d6f",
    "inception_4c/3x3_reduce_filter.bin": "103d16ae487f8c9bd22109e2769c2771c61aaeef9752382a7d6261d734b305b9",
    "inception_4c/5x5_bias.bin": "acf8f3725995b02ad9be562c303d0cf9a7b4e98d584ef87fc56f47b4e1f4e1d6",
    "inception_4c/5x5_filter.bin": "2e38f2a135069359f3f5ee13368d55363d39d1df0e0376228bd5a825a3d3a13f",
    "inception_4c/5x5_reduce_bias.bin": "676c83a6d5e56507215f266f9f960085d2d619aaaff53366f5b87dd5a201df80",
    "inception_4c/5x5_reduce_filter.bin": "e8b93ead7bc96ddc6aba7f2988a7431e33c8255a94525b42f8ac89c914b316d5",
    "inception_4c/pool_proj_bias.bin": "d50cfcfc5732c297a5c0aa6d8864f1a088ac9890e7591a36bd8b2245c6b21d67",
    "inception_4c/pool_proj_filter.bin": "0ef4bc2b8801c5b41bae9f055487663e4eefad8294283ccdaa25282bc30f1437",
    "inception_4d/1x1_bias.bin": "88dad234f96a39cef08974e9b96c4c944714a50aed8dedf59b64bd48a8f5b9ee",
    "inception_4d/1x1_filter.bin": "99033435eb470ce7dcd46355ffe2ce8033ef1e32d0ef12cb162a738b28411b5f",
    "inception_4d/3x3_bias.bin": "10ccebb5ceb1088bd1b1480e0de47dd19ff85d36e28c155c8602631df5e7b4fd",
    "inception_4d/3x3_filter.bin": "4667daa0439fd6d346a9dfc7f8f743c4258b2ae7501d4806be9d03377117414d",
    "inception_4d/3x3_reduce_bias.bin": "316f4de1dff81326f1e2853c67af80c9b58251fbf796167ab895f4a676ad7efc",
    "inception_4d/3x3_reduce_filter.bin": "b8c319493d51271ca33d634ceafc53240849d1b5bba88baad60f0537c207b372",
    "inception_4d/5x5_bias.bin": "788271668b4c1000f1749ef5ec1e2e2b6224616ab6ccc40db2deddab8f400cd4",
    "inception_4d/5x5_filter.bin": "0f756b8db339afbbe53dffdd8f0a05b06c65235e36de7cc144849827cc5aa11f",
    "inception_4d/5x5_reduce_bias.bin": "b02b6d76a085209d75c28122ef41c519d2b051a464969e6202f10c48b818fa7d",
    "inception_4d/5x5_reduce_filter.bin": "327720e37c00ace051b881d7b2d75a860ab81d884a25ad6c9348b1462c9d9000",
    "inception_4d/pool_proj_bias.bin": "450eb94ee97407f009f34fe554e1d018ca2e398c3e9a9a3dc1b858267f20dbb5",
    "inception_4d/pool_proj_filter.bin": "d960ea729201611eceab686211b9005ec6bddfbbf3954b0ee81d3dcfe39b2fd3",
    "inception_4e/1x1_bias.bin": "eaf024176b353d92e236ae05f66ef25591a8b6a54c03d8c5aea99ba583ea3b96",
    "inception_4e/1x1_filter.bin": "c4d83f6a1d2b6b85cbbfb8184754b7f592039c2bb3ae00f9398a744e4960da24",
    "inception_4e/3x3_bias.bin": "db39895c9a6dc36b41d8c21100a8c55be107dca33b15a04549af38aaaa8bb1b0",
    "inception_4e/3x3_filter.bin": "28b7abe386f27463d2e1c706671498f88e9291e34b56451b7a450f555d694245",
    "inception_4e/3x3_reduce_bias.bin": "71d6400dadd44329ac49f983f80f60fa694f0fb1a859cc4b58f615f38b185ff8",
    "inception_4e/3x3_reduce_filter.bin": "d0424e253853f9d96b97d125b30793885b4c9aa239371c0859f55e100b0eda3f",
    "inception_4e/5x5_bias.bin": "ab98d10fe37af10316c3af84c0766d302f6f2515c2ae5b3f669a2b1172b20be8",
    "inception_4e/5x5_filter.bin": "e98c74d23e2ae4be59b0b5aedd89e8dfa990d5801b62d5dc3847cd6a5233fad9",
    "inception_4e/5x5_reduce_bias.bin": "b28c6e62f7fafec068ed505763fab882c9e851b7323dcc9f2c77a4d222aeb175",
    "inception_4e/5x5_reduce_filter.bin": "0132a95f763d8bf2cf2e4c6e26aefe5bcbe54fbd73024bc096498ce676fa1fb9",
    "inception_4e/pool_proj_bias.bin": "039f0eb80137fb3eb6acc3c26ee954f95b9e9b78e6dd7ff808fe365f334931e0",
    "inception_4e/pool_proj_filter.bin": "b0f26b54a35f44b534cd32e7b4bc748310d5a44d160ef105bd715c8245d08f63",
    "inception_5a/1x1_bias.bin": "f519a02d5c4e103c5f15bef9152d875f51c8fedfb42f3696a8851133d6c4371d",
    "inception_5a/1x1_filter.bin": "aaef2d9f8cec707795c7acb796795f69ef1ba9e3d23078d719fe9a588da5e41d",
    "inception_5a/3x3_bias.bin": "d73259d57858af752f3a036eafef80c0291eab81107c7fd70e01fda1fcdeed29",
    "inception_5a/3x3_filter.bin": "7d05891db7dfc55dbe7f6ab9123aa015d6c9bba7e78616b7d9ff25c28ea7df2c",
    "inception_5a/3x3_reduce_bias.bin": "5a475b30db849f091579cd1ee25efe9ddcb6c4f75cc9ce83e6871dad3c2770f6",
    "inception_5a/3x3_reduce_filter.bin": "1a499eb3d45183d4ff176bfc4afdb9b2e4d33ef530fd680b26282efd57e25dcb",
    "inception_5a/5x5_bias.bin": "796641d60d34eea4b3e2db644c538244a7fcc164afe70338a6a55ea946630e1f",
    "inception_5a/5x5_filter.bin": "f97f94df57bbbd09bdf3d8a863a57b0de97da93772c65d8d75d2d8860be08ed2",
    "inception_5a/5x5_reduce_bias.bin": "915f1ca7fc95d6fdad154834be9fd15ffa88b06c0616798934d8efff70657422",
    "inception_5a/5x5_reduce_filter.bin": "0cd8fb30ead1b43ac221b83309c12427f8d97c7bf67ec9742e934c00541037cf",
    "inception_5a/pool_proj_bias.bin": "24e52ccbf6ee336a855398ca06f7f423f1ff49b7728ed5dcfbd6f3e2d16982da",
    "inception_5a/pool_proj_filter.bin": "3ce9657339341aaaca9490d21b49e0f5f9aebffd2e8ace4b6649f45820769b0f",
    "inception_5b/1x1_bias.bin": "710673862662efdf4930f6ca7dd0a7911292b372c1cfb3c61809e40b453ed66c",
    "inception_5b/1x1_filter.bin": "91eecdf1aa27eb5283c7810895c3a453ab81195118018eb2ca3c872e4717f406",
    "inception_5b/3x3_bias.bin": "90b6f17e32e31b5ab03e3afd1006a705d944901298bc8f84ac207d316a63fc0c",
    "inception_5b/3x3_filter.bin": "18cd648d6eed1748635105bf78a9791094dc138e87013ecae4664e00f5412c59",
    "inception_5b/3x3_reduce_bias.bin": "5070aae1867eecb221db7d5d580697cd4f3c122ac13c61537bf6363e66d2fc09",
    "inception_5b/3x3_reduce_filter.bin": "880e38949e4c9e7506b33c380bd1113fdff30c4d161f0c74044d7287ca3c330a",
    "inception_5b/5x5_bias.bin": "5dde5f1eee0f6cd2af8ef30b3f1998361ee5908f3c218c21e5faea6177b3dae3",
    "inception_5b/5x5_filter.bin": "2e6fcaea1b369ca6e62d6170b2f9545b69428f93cd4c75e05a38470d453f0ca3",
    "inception_5b/5x5_reduce_bias.bin": "0749824b69b026e10abd8937a9f5e81de8b8f7d9b5aad486b3001f6fb9158870",
    "inception_5b/5x5_reduce_filter.bin": "14aef4d79ca594b599b7919188af4ca3f7101cda7cbc1fd213020b928238048b",
    "inception_5b/pool_proj_bias.bin": "1470dc59d13ee74af352621953529f16817982ae68b665be3ab0d3ffba3f4aa3",
    "inception_5b/pool_proj_filter.bin": "a0dfa4526e78799af9b71a26a0279b93dc9afd709f8a08487c5172de92d2abb8",
    "loss3/classifier_bias.bin": "320d2d0f9a48cd9a01a30d4902d4cb603a4e03dd20792e6c8d8dedea67e7d340",
    "loss3/classifier_filter.bin": "ef057001349ecb54de1363c9d3a025020e8ff3f3e02f7174d677c7ccbbed9d30",
}
