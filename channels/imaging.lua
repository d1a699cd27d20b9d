-- imaging: studies from the modalities and the PACS (DICOM C-STORE).
--
-- on_study runs once per study, when it is stable (no new instance for the
-- quiet period, or an explicit "complete"), with the order the engine
-- matched it to: study.match says how ("accession", "study_uid",
-- "patient_modality_time" or "none") and study.order is the record the
-- orders channel kept (priority, reason, procedure, ...), or json.null.
-- A study without an order is recorded (filtered) for review; routing to
-- AI endpoints is decided here.

function on_study(study, ctx)
  if study.order == json.null then
    ctx:log("warn", "study without a matching order", study.modality, study.instances)
    ctx:filter("no matching order")
    return
  end
  if study.order.status == "cancelled" then
    ctx:filter("the order was cancelled")
    return
  end
  ctx:log("info", "study", study.match, study.order.priority, study.modality, study.instances)
end
