"""Build a small synthetic AppWorld `data/` folder so the REAL engine can be tested offline.

The real task data needs the internet (`appworld download data`), so the tests of env_appworld.py build their own
world with the package's own model layer, following ../shared/notes/appworld-synthetic.md §4: API docs, 12 base DBs
holding three people with Spotify accounts and playlists, and a handful of tasks (specs, start-DB change logs, ground
truth with real `evaluation.py` checks, dataset split files).

Run it with the side venv's Python (the trainer's venv never imports appworld):

    .aw/bin/python tests/appworld_synth/make_data.py /tmp/aw_root      # ~6 s, ~3 MB, byte-identical on rebuilds

LICENCE: everything this script writes derives from the decrypted app code. Write it to a temporary directory only
and never commit it. This script itself only calls the package's API.

Tasks (scenario = the id prefix before '_'; SGC groups by it):
  train  a1b2c3d_1..3  "How many playlists do I have ...?"  (answers 3, 2, 4; 2 tests each; full mode)
  train  b2c3d4e_1     create a private playlist "Gym Mix"   (3 tests; full mode)
  dev    e4f5a6b_1     create a private playlist "Road Trip" (3 tests; full mode, difficulty 2)
  dev    e4f5a6b_2     "How many playlists ...?" for Chen     (2 tests; full mode)
  dev    f5a6b7c_1     "How many playlists ...?" for Bruno    (2 tests; MINIMAL mode: no solution.py, difficulty 3)
"""
import json
import os
import sys

DATETIME = "2023-05-18T12:00:00"  # the frozen world clock of every task
PEOPLE = [  # (first, last, email, phone, birthday, sex, spotify password, playlist titles)
    ("Alice", "Walker", "alice.walker@example.com", "5550100001", "1990-02-11", "female", "alice-pw-1",
     ["Morning Jazz", "Focus", "Old Favourites"]),
    ("Bruno", "Diaz", "bruno.diaz@example.com", "5550100002", "1985-07-30", "male", "bruno-pw-2",
     ["Salsa Nights", "Chill"]),
    ("Chen", "Li", "chen.li@example.com", "5550100003", "1993-11-05", "male", "chen-pw-3",
     ["Lo-fi", "Running", "Piano", "Road Songs"]),
]

COUNT_INSTRUCTION = "How many playlists do I have in my Spotify account?"
COUNT_EVALUATION = '''\
import json


def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer) -> None:
    tasks = models.end.supervisor.Task.all()
    try:
        predicted_answer = json.loads(tasks[0].answer)
    except json.JSONDecodeError:
        predicted_answer = tasks[0].answer
    with test("""
        assert answers match.
        """):
        test.answer(predicted_answer, ground_truth_answer)
    with test("""
        assert no model changes.
        """):
        test.case(models.changed_model_names(), "is_falsy")
'''
COUNT_TESTS = [{"requirement": "assert answers match.", "label": "no_op_fail"},
               {"requirement": "assert no model changes.", "label": "no_op_pass"}]
COUNT_SOLUTION = '''\
def solution(apis, requester):
    passwords = {item["account_name"]: item["password"] for item in apis.supervisor.show_account_passwords()}
    profile = apis.supervisor.show_profile()
    token = apis.spotify.login(username=profile["email"], password=passwords["spotify"])["access_token"]
    count, page_index = 0, 0
    while True:
        page = apis.spotify.show_playlist_library(access_token=token, page_index=page_index)
        if not page:
            break
        count += len(page)
        page_index += 1
    apis.supervisor.complete_task(answer=count)
'''

CREATE_EVALUATION = '''\
def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer) -> None:
    with test("""
        assert only spotify playlists changed.
        """):
        test.case(models.changed_model_names(), "==", {"spotify.Playlist"})
    added, updated, removed = models.changed_records("spotify.Playlist")
    with test("""
        assert exactly one playlist titled as asked was added to the supervisor's account.
        """):
        test.case(len(added), "==", 1)
        test.case(added[0].title, "==", public_data.title)
        test.case(added[0].user.email, "==", main_user.email)
    with test("""
        assert the new playlist is private.
        """):
        test.case(added[0].is_public, "==", False)
'''
CREATE_TESTS = [
    {"requirement": "assert only spotify playlists changed.", "label": "no_op_fail"},
    {"requirement": "assert exactly one playlist titled as asked was added to the supervisor's account.",
     "label": "no_op_fail"},
    {"requirement": "assert the new playlist is private.", "label": "no_op_fail"},
]
CREATE_SOLUTION = '''\
def solution(apis, requester):
    passwords = {{item["account_name"]: item["password"] for item in apis.supervisor.show_account_passwords()}}
    profile = apis.supervisor.show_profile()
    token = apis.spotify.login(username=profile["email"], password=passwords["spotify"])["access_token"]
    apis.spotify.create_playlist(access_token=token, title={title!r}, is_public=False)
    apis.supervisor.complete_task()
'''

# (task id, split, person index, kind, difficulty, mode, extra)
TASKS = [
    ("a1b2c3d_1", "train", 0, "count", 1, "full", None),
    ("a1b2c3d_2", "train", 1, "count", 1, "full", None),
    ("a1b2c3d_3", "train", 2, "count", 2, "full", None),
    ("b2c3d4e_1", "train", 1, "create", 2, "full", "Gym Mix"),
    ("e4f5a6b_1", "dev", 0, "create", 2, "full", "Road Trip"),
    ("e4f5a6b_2", "dev", 2, "count", 1, "full", None),
    ("f5a6b7c_1", "dev", 1, "count", 3, "minimal", None),
]


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_api_docs(data_dir, apps):
    from appworld.collections.api_docs import ApiDocCollection
    from appworld.common.constants import CANARY_STRING

    # not docs.save(): it always writes the "openapi" format too, which needs openapi_spec_validator (P9)
    docs = ApiDocCollection.build(load_apps=tuple(apps))
    for app in apps:
        api_to_doc = {api: dict(doc) for api, doc in docs[app].items()}
        for doc in api_to_doc.values():
            doc["canary_string"] = CANARY_STRING  # the loader pops it without a default
        write_json(os.path.join(data_dir, "api_docs", "standard", f"{app}.json"), api_to_doc)


def write_base_dbs(data_dir, all_apps):
    from appworld.api_docs import prepare_api_docs
    from appworld.apps.api_lib import save_local_dbs
    from appworld.collections.models import ModelCollection

    mem = ":memory:synthbase"
    mc = ModelCollection.load(to_db_home_path=mem, from_db_home_path=mem, load_apps=list(all_apps), create_db=True)
    rows = []
    for app in all_apps:
        if app == "admin":
            continue
        for doc in prepare_api_docs(app):
            doc = dict(doc)
            doc["app_name_"] = doc.pop("app_name")  # app_name clashes with SQLModel.app_name
            rows.append(mc.api_docs.ApiDoc(**doc))
    mc.api_docs.ApiDoc.save_all(rows)
    for first, last, email, phone, birthday, sex, password, playlists in PEOPLE:
        user = mc.admin.MainUser(first_name=first, last_name=last, email=email, phone_number=phone,
                                 birthday=birthday, sex=sex)
        user.save()
        mc.admin.AccountPassword(main_user_id=user.id, account_name="spotify", password=password).save()
        spotify_user = mc.spotify.User.factory().build(first_name=first, last_name=last, email=email,
                                                       password=password, verified=True)
        spotify_user.save()
        for title in playlists:
            mc.spotify.Playlist.create(title=title, user_id=spotify_user.id, is_public=True).save()
    # supervisor.db stays empty (schema only), as in the real release: each task adds its own supervisor rows
    save_local_dbs(from_db_home_path=mem, to_db_home_path=os.path.join(data_dir, "base_dbs"), format="full",
                   app_names=list(all_apps), delete_if_exists=True)
    mc.close()


def write_task(data_dir, all_apps, task_id, person, kind, difficulty, mode, title):
    from appworld.apps.api_lib import save_local_dbs
    from appworld.collections.models import ModelCollection

    first, last, email, phone, birthday, sex, password, playlists = PEOPLE[person]
    task_dir = os.path.join(data_dir, "tasks", task_id)
    instruction = COUNT_INSTRUCTION if kind == "count" else \
        f'Create a new private Spotify playlist titled "{title}".'
    # 1. start DB = base + these supervisor rows, saved as change logs relative to base_dbs (P6, P7)
    mc = ModelCollection.load(to_db_home_path=f":memory:synthtask-{task_id}",
                              from_db_home_path=os.path.join(data_dir, "base_dbs"), load_apps=list(all_apps))
    supervisor = mc.supervisor.Supervisor(first_name=first, last_name=last, email=email, phone_number=phone,
                                          birthday=birthday, sex=sex)
    supervisor.save()
    mc.supervisor.AccountPassword(supervisor_id=supervisor.id, account_name="spotify", password=password).save()
    mc.supervisor.Task(supervisor_id=supervisor.id, instruction=instruction).save()
    save_local_dbs(from_db_home_path=f":memory:synthtask-{task_id}", to_db_home_path=os.path.join(task_dir, "dbs"),
                   format="changes", app_names=list(all_apps), delete_if_exists=True, save_model_hashes=True)
    mc.close()
    # 2. specs and ground truth (written by hand: GroundTruth.save() needs ruff, P9)
    from appworld.common.constants import CANARY_STRING, DB_VERSION

    write_json(os.path.join(task_dir, "specs.json"), {
        "instruction": instruction,
        "supervisor": {"first_name": first, "last_name": last, "email": email, "phone_number": phone},
        "datetime": DATETIME, "db_version": DB_VERSION, "canary_string": CANARY_STRING})
    gt = os.path.join(task_dir, "ground_truth")
    solution = COUNT_SOLUTION if kind == "count" else CREATE_SOLUTION.format(title=title)
    write_json(os.path.join(gt, "metadata.json"), {
        "mode": mode, "difficulty": difficulty, "num_apps": 2,
        "num_solution_code_lines": len(solution.strip().splitlines()), "num_apis": 4, "num_api_calls": 4})
    write_json(os.path.join(gt, "public_data.json"), {"title": title} if title else {})
    write_json(os.path.join(gt, "private_data.json"), {})
    write_text(os.path.join(gt, "answer.json"), json.dumps(len(playlists) if kind == "count" else None))
    write_text(os.path.join(gt, "evaluation.py"), COUNT_EVALUATION if kind == "count" else CREATE_EVALUATION)
    write_json(os.path.join(gt, "test_data.json"), COUNT_TESTS if kind == "count" else CREATE_TESTS)
    if mode == "full":
        write_text(os.path.join(gt, "solution.py"), solution)
        write_json(os.path.join(gt, "required_apps.json"), ["spotify"])


def build_data(root):
    """Write root/data. Must run before anything else in this process touches appworld paths (P5)."""
    os.environ["APPWORLD_ROOT"] = root
    from appworld import update_root
    from appworld.apps import get_all_apps
    from appworld.apps.api_lib import set_local_date_and_time, unset_local_date_and_time
    from appworld.common.random import set_random_seed

    update_root(root)
    data_dir = os.path.join(root, "data")
    all_apps = list(get_all_apps())  # admin + the 11 apps
    set_random_seed(100, python=True, faker_=True, model_factory=True)
    freezer = set_local_date_and_time(datetime_from_iso(DATETIME))  # deterministic created_at etc. (P14)
    try:
        write_api_docs(data_dir, [app for app in all_apps if app != "admin"])
        write_base_dbs(data_dir, all_apps)
        for task_id, _, person, kind, difficulty, mode, title in TASKS:
            write_task(data_dir, all_apps, task_id, person, kind, difficulty, mode, title)
    finally:
        unset_local_date_and_time(freezer)
    for split in ("train", "dev", "test_normal", "test_challenge"):
        ids = [t[0] for t in TASKS if t[1] == split]
        write_text(os.path.join(data_dir, "datasets", f"{split}.txt"), "".join(i + "\n" for i in ids))


def datetime_from_iso(text):
    from datetime import datetime

    return datetime.fromisoformat(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python make_data.py ROOT   (writes ROOT/data; run with the appworld side venv's python)")
    build_data(os.path.abspath(sys.argv[1]))
    print(f"wrote {os.path.join(os.path.abspath(sys.argv[1]), 'data')}", flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip the ~3 s interpreter teardown of appworld's object graph (P13)
