//! The task commands: never refused, but what they skip matters.

use super::*;

fn setup() -> (StateView, NodeRecord, ServiceRecord) {
    let (view, _) = initialised();
    let w = node(Role::Worker);
    apply(&view, &Command::AddNode(w.clone())).unwrap();
    let web = service("web", 2);
    apply(&view, &Command::CreateService(Box::new(web.clone()))).unwrap();
    (view, w, web)
}

fn schedule(create: Vec<TaskRecord>, stop: Vec<TaskId>, delete: Vec<TaskId>) -> Command {
    Command::Schedule { create, stop, delete }
}

#[test]
fn scheduling_skips_tasks_of_what_is_gone_and_deletes_only_stopped_tasks() {
    let (view, w, web) = setup();
    let t = task(&web, 1, &w.id);
    let no_node = task(&web, 2, &NodeId::random());
    let no_service = task(&service("gone", 1), 1, &w.id);
    apply(&view, &schedule(vec![t.clone(), no_node.clone(), no_service.clone()], vec![], vec![])).unwrap();
    assert_eq!(view.tasks().unwrap(), vec![t.clone()]);
    assert_eq!(view.node_tasks(&w.id).unwrap(), vec![t.clone()]);
    // The same task again does not replace it.
    let mut again = t.clone();
    again.slot = 2;
    apply(&view, &schedule(vec![again], vec![], vec![])).unwrap();
    assert_eq!(view.task(&t.id).unwrap().unwrap().slot, 1);
    // A running task is not deleted; a stopped one is, with its index entry.
    apply(&view, &schedule(vec![], vec![], vec![t.id.clone()])).unwrap();
    assert!(view.task(&t.id).unwrap().is_some());
    apply(&view, &schedule(vec![], vec![t.id.clone()], vec![])).unwrap();
    assert!(!view.task(&t.id).unwrap().unwrap().desired_running);
    apply(&view, &schedule(vec![], vec![], vec![t.id.clone()])).unwrap();
    assert!(view.task(&t.id).unwrap().is_none());
    assert!(view.node_tasks(&w.id).unwrap().is_empty());
}

#[test]
fn task_states_move_forward_only_and_only_their_node_reports_them() {
    let (view, w, web) = setup();
    let t = task(&web, 1, &w.id);
    apply(&view, &schedule(vec![t.clone()], vec![], vec![])).unwrap();
    let report = |node: &NodeId, state, message: &str, at| Command::TaskStatus {
        node: node.clone(),
        updates: vec![TaskUpdate { task: t.id.clone(), state, message: message.into() }],
        at,
    };
    let before = view.digest().unwrap();
    apply(&view, &report(&NodeId::random(), TaskState::Failed, "lie", 5)).unwrap();
    assert_eq!(view.digest().unwrap(), before, "another node's report changed the task");
    apply(&view, &report(&w.id, TaskState::Running, "", 6)).unwrap();
    let got = view.task(&t.id).unwrap().unwrap();
    assert_eq!((got.state, got.updated_at), (TaskState::Running, 6));
    apply(&view, &report(&w.id, TaskState::Preparing, "", 7)).unwrap();
    assert_eq!(view.task(&t.id).unwrap().unwrap().state, TaskState::Running, "a task moved backwards");
    apply(&view, &report(&w.id, TaskState::Failed, &"x".repeat(5000), 8)).unwrap();
    let got = view.task(&t.id).unwrap().unwrap();
    assert_eq!((got.state, got.message.len()), (TaskState::Failed, 1024), "messages are cut at 1 KiB");
    let unknown = Command::TaskStatus {
        node: w.id.clone(),
        updates: vec![TaskUpdate { task: TaskId::random(), state: TaskState::Running, message: String::new() }],
        at: 9,
    };
    let before = view.digest().unwrap();
    apply(&view, &unknown).unwrap();
    assert_eq!(view.digest().unwrap(), before);
}
