import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";
import { settingsFromLocation } from "./settings";
import "./styles.css";

const root = document.getElementById("root");
if (root === null) throw new Error("index.html has no #root element");
createRoot(root).render(
  <StrictMode>
    <App settings={settingsFromLocation(window.location)} />
  </StrictMode>,
);
